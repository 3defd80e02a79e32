"""Turn records and the per-session turn lease.

One turn runs per session at a time, across processes. The running turn's row names its owner (one
process) and a lease expiry that the owner keeps pushing forward while the turn runs; a partial unique
index allows one running row per session. A process that crashed stops renewing, and once its lease ran
out the next turn of the session takes the row over (it is marked finished with an error). Lease times
come from the wall clock of the process that writes them, not the service's injected clock: they only
decide whether an owner is still alive, so replicas need clocks within a small part of the lease.

Every operation is a plain function of a `Connection`, run through `Database.write` / `Database.read`
like those of `repository.Store`, whose session locking it shares.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Row,
    and_,
    bindparam,
    delete,
    insert,
    literal_column,
    select,
    union_all,
    update,
)

from ..domain import model
from ..domain.agents import Agent
from ..domain.errors import agent_not_found, session_not_found
from ..domain.model import Session, Status
from ..domain.turns import (
    FinishReason,
    StopMode,
    TurnKind,
    TurnRecord,
    TurnRequest,
    TurnState,
    check_continuable,
    turn_not_found,
)
from .repository import (
    _AGENT_BY_ID,
    _TURN_HOLDS_LEASE,
    _TURN_IS_RUNNING,
    Store,
    TurnLease,
    _agent_from_row,
)
from .tables import sessions, turns


@dataclass(frozen=True)
class Acquired:
    """The lease is ours: the new turn runs."""

    turn: TurnRecord
    session: Session
    agent: Agent
    # A turn whose owner's lease had run out, taken over (marked finished) to make room.
    taken_over: TurnRecord | None = None


@dataclass(frozen=True)
class Busy:
    """Another turn of the session holds the lease."""

    running: TurnRecord


@dataclass(frozen=True)
class Existing:
    """The request id was seen before: the turn it started."""

    turn: TurnRecord


Acquisition = Acquired | Busy | Existing


def _record(row: Row[Any], session_id: str) -> TurnRecord:
    m = row._mapping
    return TurnRecord(
        turn_id=m["turn_id"],
        session_id=session_id,
        session_pk=m["session_pk"],
        kind=TurnKind(m["kind"]),
        state=TurnState(m["state"]),
        owner=m["owner"],
        lease_expire_time=m["lease_expire_time"],
        request_id=m["request_id"],
        start_sequence=m["start_sequence"],
        create_time=m["create_time"],
        finish_reason=FinishReason(m["finish_reason"]) if m["finish_reason"] is not None else None,
        stop_mode=StopMode(m["stop_mode"]),
        continues_turn_id=m["continues_turn_id"],
        closed_by_turn_id=m["closed_by_turn_id"],
        pending_calls=dict(m["pending_calls"]),
        events=m["events"],
        finish_time=m["finish_time"],
    )


# Statements built once with named parameters (see repository.py for why). The conditions of the partial
# indexes are literals, not parameters: a planner uses a partial index only when it can see that the query
# implies the index's condition.
_IS_RUNNING = _TURN_IS_RUNNING
_IS_OPEN_PAUSE = and_(
    turns.c.finish_reason == literal_column(str(int(FinishReason.CLIENT_TOOL_CALLS))),
    turns.c.closed_by_turn_id.is_(None),
)
_SESSION_PK = select(sessions.c.pk).where(sessions.c.session_id == bindparam("p_session_id"))
_BY_REQUEST = select(turns).where(
    turns.c.session_pk == bindparam("p_pk"), turns.c.request_id == bindparam("p_request_id")
)
_BY_ID = select(turns).where(
    turns.c.session_pk == bindparam("p_pk"), turns.c.turn_id == bindparam("p_turn_id")
)
_RUNNING = select(turns).where(turns.c.session_pk == bindparam("p_pk"), _IS_RUNNING)
# The running turn and the paused one (at most one: each turn closes the pause before it), in one round trip
# with an index behind each branch.
_RUNNING_OR_PAUSED = union_all(
    _RUNNING,
    select(turns).where(
        turns.c.session_pk == bindparam("p_pk"),
        _IS_OPEN_PAUSE,
    ),
)
_INSERT = insert(turns)
_TAKE_OVER = (
    update(turns)
    .where(turns.c.pk == bindparam("p_pk"), _IS_RUNNING)
    .values(
        state=int(TurnState.FINISHED), finish_reason=int(FinishReason.ERROR), finish_time=bindparam("p_now")
    )
)
_CLOSE_ONE = (
    update(turns).where(turns.c.pk == bindparam("p_pk")).values(closed_by_turn_id=bindparam("p_turn_id"))
)
_REOPEN_PAUSED = (
    update(turns)
    .where(turns.c.session_pk == bindparam("p_pk"), turns.c.closed_by_turn_id == bindparam("p_turn_id"))
    .values(closed_by_turn_id=None)
)
# Only the turns the owner names (those it runs): a row it took but never ran (its process lost the turn
# between taking the lease and starting it) runs out like a crashed owner's.
_RENEW = (
    update(turns)
    .where(
        turns.c.owner == bindparam("p_owner"),
        _IS_RUNNING,
        turns.c.turn_id.in_(bindparam("p_turn_ids", expanding=True)),
    )
    .values(lease_expire_time=bindparam("p_until"))
    .returning(turns.c.turn_id, turns.c.stop_mode)
)
_FINISH = (
    update(turns)
    .where(
        turns.c.turn_id == bindparam("p_turn_id"),
        turns.c.owner == bindparam("p_owner"),
        _IS_RUNNING,
    )
    .values(
        state=int(TurnState.FINISHED),
        finish_reason=bindparam("p_reason"),
        pending_calls=bindparam("p_pending"),
        events=bindparam("p_events"),
        finish_time=bindparam("p_now"),
    )
)
# A turn whose lease was ended under it (a clear, a restore, a take-over) still leaves its events for the
# replays of its request id.
_KEEP_EVENTS = (
    update(turns)
    .where(
        turns.c.turn_id == bindparam("p_turn_id"),
        turns.c.owner == bindparam("p_owner"),
        turns.c.state == literal_column(str(int(TurnState.FINISHED))),
        turns.c.events.is_(None),
    )
    .values(events=bindparam("p_events"))
)
_ABANDON = delete(turns).where(
    turns.c.turn_id == bindparam("p_turn_id"),
    turns.c.owner == bindparam("p_owner"),
    _IS_RUNNING,
)
_REQUEST_STOP = update(turns).where(turns.c.pk == bindparam("p_pk")).values(stop_mode=bindparam("p_mode"))


class TurnStore:
    """Turn records and leases, in the database of `store`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = store.db

    def _session_pk(self, conn: Connection, session_id: str) -> int:
        pk = conn.execute(_SESSION_PK, {"p_session_id": session_id}).scalar()
        if pk is None:
            raise session_not_found(session_id)
        return int(pk)

    async def acquire(
        self,
        request: TurnRequest,
        *,
        turn_id: str,
        owner: str,
        lease_now: datetime,
        lease_until: datetime,
        now: datetime,
    ) -> Acquisition:
        """Starts turn `turn_id` of the session if no live lease stands in the way, in one transaction
        under the session's lock, and reads the session's agent with it. A request id seen before returns
        its turn instead (whatever the session's status: a retry replays); otherwise the session must be
        writable, and a continue must name the session's open pause, before a running turn is reported
        (`Busy`): a request that cannot start must not set off its multitask strategy."""
        sid = request.session_id

        def op(conn: Connection) -> Acquisition:
            session = self.store._lock_session(conn, sid)
            if request.request_id:
                row = conn.execute(
                    _BY_REQUEST, {"p_pk": session.pk, "p_request_id": request.request_id}
                ).first()
                if row is not None:
                    return Existing(_record(row, sid))
            model.ensure_writable(session, now)
            agent_row = conn.execute(_AGENT_BY_ID, {"p_agent_id": session.agent_id}).first()
            if agent_row is None:
                raise agent_not_found(session.agent_id)
            taken_over = None
            rows = conn.execute(_RUNNING_OR_PAUSED, {"p_pk": session.pk}).all()
            running_row = next((r for r in rows if r.state == TurnState.RUNNING), None)
            paused_rows = [r for r in rows if r.state != TurnState.RUNNING]
            # Checked before the running turn is looked at: a request that cannot start must not stop
            # (interrupt, rollback) or wait for (enqueue) the turn that runs.
            if request.kind is TurnKind.CONTINUE:
                paused_row = next((r for r in paused_rows if r.turn_id == request.continue_turn_id), None)
                if paused_row is None:  # not the open pause: read it to say why
                    paused_row = conn.execute(
                        _BY_ID, {"p_pk": session.pk, "p_turn_id": request.continue_turn_id}
                    ).first()
                if paused_row is None:
                    raise turn_not_found(sid, request.continue_turn_id)
                check_continuable(_record(paused_row, sid), request)
            if running_row is not None:
                running = _record(running_row, sid)
                if running.leased(lease_now):
                    return Busy(running)
                conn.execute(_TAKE_OVER, {"p_pk": running_row.pk, "p_now": now})
                taken_over = running
            # A paused turn is continued by this turn, or left behind by it: either way it is closed.
            for row in paused_rows:
                conn.execute(_CLOSE_ONE, {"p_pk": row.pk, "p_turn_id": turn_id})
            after = session
            if request.kind is TurnKind.TRIGGER:  # the others store a message, which is activity
                after = model.record_activity(session, now)
                self.store._save_session(conn, session, after)
            record = TurnRecord(
                turn_id=turn_id,
                session_id=sid,
                session_pk=session.pk,
                kind=request.kind,
                state=TurnState.RUNNING,
                owner=owner,
                lease_expire_time=lease_until,
                request_id=request.request_id or None,
                start_sequence=session.last_sequence,
                create_time=now,
                continues_turn_id=request.continue_turn_id or None,
            )
            conn.execute(_INSERT, _values(record))
            return Acquired(record, after, _agent_from_row(agent_row), taken_over)

        return await self.db.write(op)

    async def renew(
        self, owner: str, turn_ids: Collection[str], lease_until: datetime
    ) -> dict[str, StopMode]:
        """Pushes the lease of the running turns `turn_ids` of `owner` to `lease_until`. Returns the turns
        still held, with the stop each was asked for (a turn missing from the answer lost its lease)."""
        if not turn_ids:
            return {}

        def op(conn: Connection) -> dict[str, StopMode]:
            params = {"p_owner": owner, "p_turn_ids": list(turn_ids), "p_until": lease_until}
            return {r.turn_id: StopMode(r.stop_mode) for r in conn.execute(_RENEW, params)}

        return await self.db.write(op)

    async def record_activity(self, lease: TurnLease, now: datetime) -> Session | None:
        """A running turn is activity: renews its session as a heartbeat does (auto-renew decides; a
        `renewed` event when the expiry moved), while the turn holds its lease and the session is active.
        Returns the session, or None when nothing was recorded."""
        store = self.store

        def fn(conn: Connection, sink: list[Any]) -> Session | None:
            before = store._lock_session_pk(conn, lease.session_pk)
            if before is None or before.status(now) is not Status.ACTIVE:
                return None
            held = conn.execute(_TURN_HOLDS_LEASE, {"p_turn_id": lease.turn_id, "p_owner": lease.owner})
            if held.first() is None:
                return None
            after = model.record_activity(before, now)
            if after.expire_time != before.expire_time:
                after = store._event(conn, after, "renewed", now, sink, detail={"manual": False})
            store._save_session(conn, before, after)
            return after

        return await store._write(fn)

    async def finish(
        self,
        turn_id: str,
        *,
        owner: str,
        reason: FinishReason,
        pending_calls: Mapping[str, str],
        events: bytes,
        now: datetime,
    ) -> bool:
        """Releases the lease and records how the turn ended. False when the lease was lost meanwhile (its
        events are kept all the same, for replays, unless another turn's are already there)."""

        def op(conn: Connection) -> bool:
            result = conn.execute(
                _FINISH,
                {
                    "p_turn_id": turn_id,
                    "p_owner": owner,
                    "p_reason": int(reason),
                    "p_pending": dict(pending_calls),
                    "p_events": events,
                    "p_now": now,
                },
            )
            if result.rowcount:
                return True
            conn.execute(_KEEP_EVENTS, {"p_turn_id": turn_id, "p_owner": owner, "p_events": events})
            return False

        return await self.db.write(op)

    async def abandon(self, turn: TurnRecord) -> None:
        """Forgets a turn that never started (its input could not be stored), reopening the paused turn
        it closed so that the caller can try again: only while the turn still held its lease. A clear, a
        restore or a take-over that ended it meanwhile closed that pause for good (its calls belong to a
        history that is gone, or the turn after it owns the session now)."""

        def op(conn: Connection) -> None:
            if conn.execute(_ABANDON, {"p_turn_id": turn.turn_id, "p_owner": turn.owner}).rowcount:
                conn.execute(_REOPEN_PAUSED, {"p_pk": turn.session_pk, "p_turn_id": turn.turn_id})

        await self.db.write(op)

    async def request_stop(self, session_id: str, turn_id: str, mode: StopMode) -> TurnRecord | None:
        """Asks the session's running turn (only `turn_id`, when given) to stop; its owner sees the request
        when it next renews its lease. Returns the turn asked, or None when no such turn runs."""

        def op(conn: Connection) -> TurnRecord | None:
            pk = self._session_pk(conn, session_id)
            row = conn.execute(_RUNNING, {"p_pk": pk}).first()
            if row is None or (turn_id and row.turn_id != turn_id):
                return None
            record = _record(row, session_id)
            if mode > record.stop_mode:
                conn.execute(_REQUEST_STOP, {"p_pk": row.pk, "p_mode": int(mode)})
            return record

        return await self.db.write(op)

    async def get(self, session_id: str, turn_id: str) -> TurnRecord | None:
        def op(conn: Connection) -> TurnRecord | None:
            pk = self._session_pk(conn, session_id)
            row = conn.execute(_BY_ID, {"p_pk": pk, "p_turn_id": turn_id}).first()
            return _record(row, session_id) if row is not None else None

        return await self.db.read(op)

    async def running(self, session_id: str) -> TurnRecord | None:
        def op(conn: Connection) -> TurnRecord | None:
            pk = self._session_pk(conn, session_id)
            row = conn.execute(_RUNNING, {"p_pk": pk}).first()
            return _record(row, session_id) if row is not None else None

        return await self.db.read(op)


def _values(t: TurnRecord) -> dict[str, Any]:
    return {
        "turn_id": t.turn_id,
        "session_pk": t.session_pk,
        "request_id": t.request_id,
        "kind": int(t.kind),
        "state": int(t.state),
        "owner": t.owner,
        "lease_expire_time": t.lease_expire_time,
        "stop_mode": int(t.stop_mode),
        "start_sequence": t.start_sequence,
        "continues_turn_id": t.continues_turn_id,
        "closed_by_turn_id": t.closed_by_turn_id,
        "pending_calls": dict(t.pending_calls),
        "finish_reason": int(t.finish_reason) if t.finish_reason is not None else None,
        "events": t.events,
        "create_time": t.create_time,
        "finish_time": t.finish_time,
    }
