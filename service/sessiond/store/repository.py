"""The storage adapter: domain objects in, domain objects out. Rows never leave this module.

Every write is one transaction run through `Database.write`, so a change and its counters commit together
or not at all. Hot paths use Core statements; the statements a list or a page runs each have an index.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol, TypeVar

from sqlalchemy import (
    JSON,
    Boolean,
    Connection,
    Row,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    literal_column,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import Select

from ..domain import model, state
from ..domain.agents import Agent, AgentOrigin
from ..domain.errors import (
    Aborted,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    NotFound,
    agent_not_found,
    etag_mismatch,
    session_exists,
    session_not_found,
)
from ..domain.model import NewMessage, Session, Status, StoredMessage
from ..domain.policy import EffectivePolicy, Source, TimeoutPolicy
from ..domain.state import Scope, ScopedChanges
from ..domain.turns import FinishReason, TurnState
from ..domain.validation import Limits, check_variables
from .database import Database, Outcome, WriteCache
from .tables import (
    UTCDateTime,
    agents,
    messages,
    scoped_variables,
    session_events,
    session_labels,
    sessions,
    sqlite_time,
    tool_calls,
    turns,
)

T = TypeVar("T")

# Where a sweeper pass stands: the (time, pk) of the last row it handled.
SweepCursor = tuple[datetime, int]
SWEEP_START: SweepCursor = (datetime(1970, 1, 1, tzinfo=UTC), 0)


class EventEncoder(Protocol):
    """Turns a change into its event: (payload to store, live event to publish). Supplied by the layer
    that knows the wire format; the store keeps both opaque."""

    def __call__(
        self,
        kind: str,
        event_id: int,
        time: datetime,
        session: Session,
        detail: Mapping[str, Any],
        messages: Sequence[StoredMessage],
    ) -> tuple[bytes, Any]: ...


@dataclass(frozen=True)
class SessionFilter:
    agent_id: str = ""
    user_id: str = ""
    status: Status | None = None
    metadata: Mapping[str, str] | None = None


@dataclass(frozen=True)
class TurnLease:
    """What a turn's own writes (its input, its answer, a rollback's delete, its durable events) are made
    under. They land only in the session the turn started in, never in one created again under the same
    id, and (but for the events) only while the turn still holds its lease: a clear, a restore, a delete
    or a take-over ends the lease, and with it the turn's right to write. The turn's own row is what
    tells: it goes with its session (a primary key alone would not, as SQLite may give a new session the
    primary key of the one deleted last)."""

    session_pk: int
    turn_id: str
    owner: str


def turn_lost(session_id: str, turn_id: str) -> Aborted:
    return Aborted(
        f"turn {turn_id!r} no longer holds the lease of session {session_id!r} (the session was cleared or "
        "restored, or another turn took the lease over); its output was not stored",
        reason="TURN_LOST",
        metadata={"session_id": session_id, "turn_id": turn_id},
    )


def session_gone(session_id: str, turn_id: str) -> NotFound:
    return NotFound(
        f"session {session_id!r} was deleted while turn {turn_id!r} ran; its output was not stored",
        reason="SESSION_NOT_FOUND",
        metadata={"session_id": session_id, "turn_id": turn_id},
    )


@dataclass(frozen=True)
class MessagePageQuery:
    descending: bool
    visible_only: bool
    after_sequence: int  # exclusive lower bound (0: none)
    before_sequence: int  # exclusive upper bound (0: none)
    limit: int


# --- rows <-> domain ------------------------------------------------------------------------------------


def _session_from_row(row: Row[Any]) -> Session:
    m = row._mapping
    policy = m["policy"]
    session_tier = TimeoutPolicy.from_dict(policy.get("session"))
    agent_tier = TimeoutPolicy.from_dict(policy.get("agent"))
    sources = tuple(
        Source.SESSION
        if getattr(session_tier, name) is not None
        else Source.AGENT
        if getattr(agent_tier, name) is not None
        else Source.GLOBAL
        for name in ("timeout_minutes", "auto_renew", "max_duration_minutes", "warning_threshold_minutes")
    )
    return Session(
        pk=m["pk"],
        session_id=m["session_id"],
        agent_id=m["agent_id"],
        user_id=m["user_id"],
        metadata=m["metadata"],
        variables=m["variables"],
        policy=session_tier,
        agent_policy=agent_tier,
        effective=EffectivePolicy(
            timeout_minutes=m["timeout_minutes"],
            auto_renew=m["auto_renew"],
            max_duration_minutes=m["max_duration_minutes"],
            warning_threshold_minutes=m["warning_threshold_minutes"],
            sources=sources,  # type: ignore[arg-type]
        ),
        create_time=m["create_time"],
        update_time=m["update_time"],
        last_activity_time=m["last_activity_time"],
        start_time=m["start_time"],
        anchor_time=m["anchor_time"],
        expire_time=m["expire_time"],
        max_expire_time=m["max_expire_time"],
        end_time=m["end_time"],
        renewal_count=m["renewal_count"],
        message_count=m["message_count"],
        last_sequence=m["last_sequence"],
        version=m["version"],
        request_id=m["request_id"],
        last_event_id=m["last_event_id"],
        warned_expire_time=m["warned_expire_time"],
        notified_expire_time=m["notified_expire_time"],
        incarnation=m["incarnation"],
    )


def _session_with_shared(row: Row[Any]) -> Session:
    """A session read with its shared scopes joined (`_SHARED_COLUMNS`)."""
    m = row._mapping
    shared = {Scope.APP: m["app_variables"] or {}, Scope.USER: m["user_variables"] or {}}
    return _session_from_row(row).evolve(shared=shared)


def _session_values(s: Session) -> dict[str, Any]:
    """The columns a write may change (everything but the keys and the immutable fields)."""
    return {
        "metadata": s.metadata,
        "variables": s.variables,
        "policy": {"session": s.policy.as_dict(), "agent": s.agent_policy.as_dict()},
        "timeout_minutes": s.effective.timeout_minutes,
        "auto_renew": s.effective.auto_renew,
        "max_duration_minutes": s.effective.max_duration_minutes,
        "warning_threshold_minutes": s.effective.warning_threshold_minutes,
        "update_time": s.update_time,
        "last_activity_time": s.last_activity_time,
        "start_time": s.start_time,
        "anchor_time": s.anchor_time,
        "expire_time": s.expire_time,
        "max_expire_time": s.max_expire_time,
        "warn_time": s.warn_time,
        "end_time": s.end_time,
        "renewal_count": s.renewal_count,
        "message_count": s.message_count,
        "last_sequence": s.last_sequence,
        "version": s.version,
        "last_event_id": s.last_event_id,
        "warned_expire_time": s.warned_expire_time,
        "notified_expire_time": s.notified_expire_time,
        "next_notify_time": s.next_notify_time,
    }


def _activity_values(s: Session) -> dict[str, Any]:
    return {
        "p_pk": s.pk,
        "update_time": s.update_time,
        "last_activity_time": s.last_activity_time,
        "anchor_time": s.anchor_time,
        "expire_time": s.expire_time,
        "warn_time": s.warn_time,
        "renewal_count": s.renewal_count,
        "message_count": s.message_count,
        "last_sequence": s.last_sequence,
        "version": s.version,
        "last_event_id": s.last_event_id,
        "next_notify_time": s.next_notify_time,
    }


_ROLES = {int(r): r for r in model.Role}
_MESSAGE_STATUSES = {int(s): s for s in model.MessageStatus}


def _message_from_row(row: Sequence[Any], session_id: str) -> StoredMessage:
    """A message from a row of `_MESSAGE_COLUMNS` (unpacked by position: this runs for every message
    of every page)."""
    sequence, message_id, role, content, hidden, metadata, status, turn_id, create_time, start, end = row
    return StoredMessage(
        session_id,
        sequence,
        message_id,
        _ROLES[role],
        content,
        hidden,
        metadata,
        _MESSAGE_STATUSES[status],
        turn_id,
        create_time,
        start,
        end,
    )


def _agent_from_row(row: Row[Any]) -> Agent:
    m = row._mapping
    return Agent(
        agent_id=m["agent_id"],
        display_name=m["display_name"],
        backend=m["backend"],
        timeout_defaults=TimeoutPolicy.from_dict(m["timeout_defaults"]),
        history_window=m["history_window"],
        origin=AgentOrigin(m["origin"]),
        create_time=m["create_time"],
        update_time=m["update_time"],
        version=m["version"],
    )


_MESSAGE_COLUMNS = (
    messages.c.sequence,
    messages.c.message_id,
    messages.c.role,
    messages.c.content,
    messages.c.hidden,
    messages.c.metadata,
    messages.c.status,
    messages.c.turn_id,
    messages.c.create_time,
    messages.c.group_start,
    messages.c.group_end,
)


# Statements built once with named parameters: building them per call (literal values in `where` and
# `values`) made SQLAlchemy's cache-key work the largest cost of a write.
_MUTABLE_SESSION_COLUMNS = (
    "metadata",
    "variables",
    "policy",
    "timeout_minutes",
    "auto_renew",
    "max_duration_minutes",
    "warning_threshold_minutes",
    "update_time",
    "last_activity_time",
    "start_time",
    "anchor_time",
    "expire_time",
    "max_expire_time",
    "warn_time",
    "end_time",
    "renewal_count",
    "message_count",
    "last_sequence",
    "version",
    "last_event_id",
    "warned_expire_time",
    "notified_expire_time",
    "next_notify_time",
)
_SESSION_BY_ID = select(sessions).where(sessions.c.session_id == bindparam("p_session_id"))
_SESSION_BY_ID_FOR_UPDATE = _SESSION_BY_ID.with_for_update()
_SESSIONS_BY_IDS = select(sessions).where(sessions.c.session_id.in_(bindparam("p_ids", expanding=True)))
_SESSION_BY_REQUEST = select(sessions).where(sessions.c.request_id == bindparam("p_request_id"))
_SESSIONS_BY_REQUESTS = select(sessions).where(sessions.c.request_id.in_(bindparam("p_ids", expanding=True)))
_SESSION_PK_BY_ID = select(sessions.c.pk).where(sessions.c.session_id == bindparam("p_session_id"))
_SESSION_BY_PK = select(sessions).where(sessions.c.pk == bindparam("p_pk"))
_SESSION_BY_PK_FOR_UPDATE = _SESSION_BY_PK.with_for_update()
# Turn leases (see store/turns.py). The running state is a literal, so that the partial indexes apply.
_TURN_IS_RUNNING = turns.c.state == literal_column(str(int(TurnState.RUNNING)))
_TURN_HOLDS_LEASE = select(turns.c.pk).where(
    turns.c.turn_id == bindparam("p_turn_id"), turns.c.owner == bindparam("p_owner"), _TURN_IS_RUNNING
)
_TURN_ROW = select(turns.c.session_pk, turns.c.state).where(
    turns.c.turn_id == bindparam("p_turn_id"), turns.c.owner == bindparam("p_owner")
)
_RUNNING_TURN_IDS = select(turns.c.turn_id).where(turns.c.session_pk == bindparam("p_pk"), _TURN_IS_RUNNING)
# A clear or a restore ends the running turn's lease in its own transaction: the turn's later writes
# are refused (`TurnLease`) and the next turn of the new history may start at once.
_END_RUNNING_TURNS = (
    update(turns)
    .where(turns.c.session_pk == bindparam("p_pk"), _TURN_IS_RUNNING)
    .values(
        state=int(TurnState.FINISHED), finish_reason=int(FinishReason.ERROR), finish_time=bindparam("p_now")
    )
    .returning(turns.c.turn_id)
)
# ...and closes its open pause (a turn waiting for client tool results): the calls went with the old
# history, and a continue would answer calls that are no longer there. "" marks a pause closed that way.
_CLOSE_OPEN_PAUSE = (
    update(turns)
    .where(
        turns.c.session_pk == bindparam("p_pk"),
        turns.c.finish_reason == literal_column(str(int(FinishReason.CLIENT_TOOL_CALLS))),
        turns.c.closed_by_turn_id.is_(None),
    )
    .values(closed_by_turn_id="")
)
_UPDATE_SESSION = (
    update(sessions)
    .where(sessions.c.pk == bindparam("p_pk"))
    .values({name: bindparam(name) for name in _MUTABLE_SESSION_COLUMNS})
)
# Activity (appends, heartbeats) changes only these.
_ACTIVITY_COLUMNS = (
    "update_time",
    "last_activity_time",
    "anchor_time",
    "expire_time",
    "warn_time",
    "renewal_count",
    "message_count",
    "last_sequence",
    "version",
    "last_event_id",
    "next_notify_time",
)
_UPDATE_SESSION_ACTIVITY = (
    update(sessions)
    .where(sessions.c.pk == bindparam("p_pk"))
    .values({name: bindparam(name) for name in _ACTIVITY_COLUMNS})
)
_INSERT_EVENT = insert(session_events)


def _all_columns(table: Any) -> Any:
    return insert(table).values({c.name: bindparam(c.name) for c in table.c})


class _SQLiteBatch:
    """A statement of the grouped writes (appends, creates), compiled once for SQLite and run through the
    driver's `executemany` with each row's values converted as their column types would convert them.
    SQLAlchemy's per-row parameter processing (a dict per row, a bind processor per value) cost more than
    SQLite's own work on these statements, which run for every append and every create."""

    def __init__(self, stmt: Any, table: Any, params: Mapping[str, str] | None = None) -> None:
        compiled = stmt.compile(dialect=sqlite.dialect(paramstyle="qmark"))
        self.sql = str(compiled)
        params = params or {}
        self._pairs = [(n, _sqlite_converter(table.c[params.get(n, n)].type)) for n in compiled.positiontup]

    def run(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        pairs = self._pairs
        conn.exec_driver_sql(
            self.sql, [tuple([row[n] if c is None else c(row[n]) for n, c in pairs]) for row in rows]
        )


def _sqlite_converter(column_type: Any) -> Callable[[Any], Any] | None:
    if isinstance(column_type, UTCDateTime):
        return _sqlite_time_or_none
    if isinstance(column_type, JSON):
        return _json_column  # SQLAlchemy's JSON type on SQLite, when the engine names no serializer
    if isinstance(column_type, Boolean):
        return None  # the driver stores a bool as 1 or 0, as SQLAlchemy's processor does
    if column_type.bind_processor(sqlite.dialect()) is not None:
        # A type this class does not know how to convert: its values would reach the table unconverted.
        raise TypeError(f"_SQLiteBatch cannot convert values of {column_type!r}")
    return None


def _json_column(value: Any) -> str:
    # `json.dumps`, with the empty object most messages' metadata is spared its encoder run.
    return "{}" if type(value) is dict and not value else json.dumps(value)


def _sqlite_time_or_none(value: datetime | None) -> int | None:
    return None if value is None else sqlite_time(value)


_SQLITE_INSERT_MESSAGES = _SQLiteBatch(_all_columns(messages), messages)
_SQLITE_INSERT_EVENTS = _SQLiteBatch(_all_columns(session_events), session_events)
_SQLITE_INSERT_SESSIONS = _SQLiteBatch(_all_columns(sessions), sessions)
_LAST_SESSION_PK = select(func.coalesce(func.max(sessions.c.pk), 0))
_SQLITE_UPDATE_ACTIVITY = _SQLiteBatch(_UPDATE_SESSION_ACTIVITY, sessions, {"p_pk": "pk"})
_EVENTS_AFTER = (
    select(session_events.c.event_id, session_events.c.payload)
    .where(
        session_events.c.session_pk == bindparam("p_pk"),
        session_events.c.event_id > bindparam("p_after"),
    )
    .order_by(session_events.c.event_id)
    .limit(bindparam("p_limit"))
)
# The sweeper walks its queries by keyset, (time, pk) past the last row of the previous batch: on
# PostgreSQL the rows a batch updated or deleted leave dead index entries behind, and a plain
# "ORDER BY time LIMIT n" would walk every one of them again in every later batch (a million-session
# purge slowed to 190 rows/s that way).
_SWEEP_AFTER_TIME = bindparam("p_after_time", type_=UTCDateTime())
_DUE_NOTICES = (
    select(sessions)
    .where(
        sessions.c.next_notify_time < bindparam("p_now", type_=UTCDateTime()),
        tuple_(sessions.c.next_notify_time, sessions.c.pk)
        > tuple_(_SWEEP_AFTER_TIME, bindparam("p_after_pk")),
    )
    .order_by(sessions.c.next_notify_time, sessions.c.pk)
    .limit(bindparam("p_limit"))
)
_UPDATE_NOTICES = (
    update(sessions)
    .where(sessions.c.pk == bindparam("p_pk"))
    .values(
        {
            name: bindparam(name)
            for name in ("last_event_id", "warned_expire_time", "notified_expire_time", "next_notify_time")
        }
    )
)


def _purge_query(at: Any, state: Any) -> Select[Any]:
    """Sessions in `state` whose time `at` is past the cutoff, walked by keyset on (at, pk)."""
    return (
        select(sessions, at.label("at"))
        .where(
            state,
            at <= bindparam("p_cutoff", type_=UTCDateTime()),
            tuple_(at, sessions.c.pk) > tuple_(_SWEEP_AFTER_TIME, bindparam("p_after_pk")),
        )
        .order_by(at, sessions.c.pk)
        .limit(bindparam("p_limit"))
    )


_PURGE_ENDED = _purge_query(sessions.c.end_time, sessions.c.end_time.is_not(None))
_PURGE_EXPIRED = _purge_query(sessions.c.expire_time, sessions.c.end_time.is_(None))
_INSERT_SESSION = insert(sessions).returning(sessions.c.pk)
_INSERT_SESSIONS = insert(sessions).returning(sessions.c.pk, sort_by_parameter_order=True)
_SESSION_IDS_TAKEN = select(sessions.c.session_id).where(
    sessions.c.session_id.in_(bindparam("p_ids", expanding=True))
)
_AGENT_BY_ID = select(agents).where(agents.c.agent_id == bindparam("p_agent_id"))
_AGENTS_BY_IDS = select(agents).where(agents.c.agent_id.in_(bindparam("p_ids", expanding=True)))
_SHARED_KEY = tuple_(scoped_variables.c.scope, scoped_variables.c.agent_id, scoped_variables.c.user_id)
_SHARED_BY_KEYS = select(scoped_variables).where(_SHARED_KEY.in_(bindparam("p_keys", expanding=True)))
# Reads that show sessions merged join their two shared scopes (primary-key lookups) in the same statement:
# a second statement would be a second round trip through aiosqlite on every GetSession.
_APP_SCOPE = scoped_variables.alias("app_scope")
_USER_SCOPE = scoped_variables.alias("user_scope")
_SESSIONS_WITH_SHARED = sessions.outerjoin(
    _APP_SCOPE,
    and_(
        _APP_SCOPE.c.scope == int(Scope.APP),
        _APP_SCOPE.c.agent_id == sessions.c.agent_id,
        _APP_SCOPE.c.user_id == "",
    ),
).outerjoin(
    _USER_SCOPE,
    and_(
        _USER_SCOPE.c.scope == int(Scope.USER),
        _USER_SCOPE.c.agent_id == sessions.c.agent_id,
        _USER_SCOPE.c.user_id == sessions.c.user_id,
    ),
)
_SHARED_COLUMNS = (
    _APP_SCOPE.c.variables.label("app_variables"),
    _USER_SCOPE.c.variables.label("user_variables"),
)
_SESSION_WITH_SHARED_BY_ID = (
    select(sessions, *_SHARED_COLUMNS)
    .select_from(_SESSIONS_WITH_SHARED)
    .where(sessions.c.session_id == bindparam("p_session_id"))
)
_SHARED_BY_KEY = select(scoped_variables.c.variables).where(
    scoped_variables.c.scope == bindparam("p_scope"),
    scoped_variables.c.agent_id == bindparam("p_agent_id"),
    scoped_variables.c.user_id == bindparam("p_user_id"),
)
# Messages by (session_pk, message_id) pairs, any number of them in one statement and one parameter (or
# two): the pairs become a table (JSON on SQLite, arrays on PostgreSQL) joined to the messages' unique key,
# so each pair is one index probe. An IN list of pairs would be rendered anew for every length, and SQLite
# scans the whole index for a row-value IN.
_KEYED_COLUMNS = ", ".join(f"m.{c.name}" for c in _MESSAGE_COLUMNS)
_MESSAGES_BY_KEYS = {
    "sqlite": text(
        f"SELECT m.session_pk, {_KEYED_COLUMNS} FROM json_each(:p_keys) AS k JOIN messages AS m"
        " ON m.session_pk = json_extract(k.value, '$[0]') AND m.message_id = json_extract(k.value, '$[1]')"
    ).columns(messages.c.session_pk, *_MESSAGE_COLUMNS),
    "postgresql": text(
        f"SELECT m.session_pk, {_KEYED_COLUMNS}"
        " FROM unnest(CAST(:p_pks AS bigint[]), CAST(:p_ids AS text[])) AS k(pk, id) JOIN messages AS m"
        " ON m.session_pk = k.pk AND m.message_id = k.id"
    ).columns(messages.c.session_pk, *_MESSAGE_COLUMNS),
}


@functools.cache
def _message_page(visible_only: bool, after: bool, before: bool, descending: bool) -> Select[Any]:
    """The statement of a page of messages; one object per shape (16 in all), so that SQLAlchemy finds
    its compiled form by the key memoized on it instead of building and hashing a new statement per page."""
    stmt = select(*_MESSAGE_COLUMNS).where(messages.c.session_pk == _SESSION_PK_BY_ID.scalar_subquery())
    if visible_only:
        stmt = stmt.where(messages.c.hidden.is_(False))
    if after:
        stmt = stmt.where(messages.c.sequence > bindparam("p_after"))
    if before:
        stmt = stmt.where(messages.c.sequence < bindparam("p_before"))
    order = messages.c.sequence.desc() if descending else messages.c.sequence.asc()
    return stmt.order_by(order).limit(bindparam("p_limit"))


def _page_of_messages(conn: Connection, session_id: str, q: MessagePageQuery) -> list[StoredMessage]:
    stmt = _message_page(q.visible_only, bool(q.after_sequence), bool(q.before_sequence), q.descending)
    params = {
        "p_session_id": session_id,
        "p_after": q.after_sequence,
        "p_before": q.before_sequence,
        "p_limit": q.limit,
    }
    return [_message_from_row(r, session_id) for r in conn.execute(stmt, params).all()]


class Store:
    """Sessions, messages and agents, on SQLite or PostgreSQL."""

    def __init__(
        self,
        db: Database,
        *,
        encode_event: EventEncoder | None = None,
        publish: Callable[[Any], None] | None = None,
    ) -> None:
        self.db = db
        self._for_update = db.dialect == "postgresql"
        self._encode_event = encode_event
        self._publish = publish
        # A call id used again in a session (models that number calls per turn: `call_0`) stands for its
        # newest call, so a result links to the call it answers, not to the first call of that id.
        insert_call = (postgresql if self._for_update else sqlite).insert(tool_calls)
        self._record_calls = insert_call.on_conflict_do_update(
            index_elements=[tool_calls.c.session_pk, tool_calls.c.call_id],
            set_={"sequence": insert_call.excluded.sequence},
        )

    # --- events ----------------------------------------------------------------------------------------

    def _event(
        self,
        conn: Connection | None,
        session: Session,
        kind: str,
        now: datetime,
        sink: list[Any],
        *,
        detail: Mapping[str, Any] | None = None,
        messages_: Sequence[StoredMessage] = (),
        pending: list[dict[str, Any]] | None = None,
    ) -> Session:
        """Numbers the session's next event, stores it (with `conn`; None: live only; or into `pending`,
        for the caller to insert with the rest of a batch) and queues its live form for publication once
        the transaction commits. Returns the session with its new event id."""
        if self._encode_event is None:
            return session
        event_id = session.last_event_id + 1
        payload, live = self._encode_event(kind, event_id, now, session, detail or {}, messages_)
        row = {"session_pk": session.pk, "event_id": event_id, "kind": kind, "time": now, "payload": payload}
        if pending is not None:
            pending.append(row)
        elif conn is not None:
            conn.execute(_INSERT_EVENT, row)
        sink.append(live)
        return session.evolve(last_event_id=event_id)

    def _deliver(self, events: Sequence[Any]) -> None:
        if self._publish is not None:
            for live in events:
                self._publish(live)

    async def _write(
        self,
        fn: Callable[[Connection, list[Any]], T],
        live: list[Any] | None = None,
        on_commit: Callable[[], None] | None = None,
    ) -> T:
        """A write whose events are published once it commits (never for a write that failed), and then
        `on_commit` is called: both even when the caller went away meanwhile (`Database`'s after-commit
        step), as the write commits all the same. `live`, when given, receives the events too."""
        op = _Write(self, fn, on_commit)
        result: T = await self.db.write(op)
        if live is not None:
            live.extend(op.sink)
        return result

    async def list_events(
        self, session_id: str, *, after_event_id: int, limit: int
    ) -> tuple[Session, list[bytes]]:
        """Stored events of a session with ids above `after_event_id`, oldest first, and the session."""

        def op(conn: Connection) -> tuple[Session, list[bytes]]:
            row = conn.execute(_SESSION_BY_ID, {"p_session_id": session_id}).first()
            if row is None:
                raise session_not_found(session_id)
            session = _session_from_row(row)
            params = {"p_pk": session.pk, "p_after": after_event_id, "p_limit": limit}
            return session, [r.payload for r in conn.execute(_EVENTS_AFTER, params)]

        return await self.db.read(op)

    async def record_event(
        self,
        session_id: str,
        kind: str,
        now: datetime,
        detail: Mapping[str, Any],
        *,
        lease: TurnLease | None = None,
    ) -> Session:
        """Stores one event that changes nothing else (a turn started or finished). With the turn's `lease`,
        only in the session the turn started in (SESSION_NOT_FOUND once that was deleted, even if another
        was created under its id)."""

        def fn(conn: Connection, sink: list[Any]) -> Session:
            if lease is None:
                before = self._lock_session(conn, session_id)
            else:
                found = self._lock_session_pk(conn, lease.session_pk)
                if found is None:
                    raise session_gone(session_id, lease.turn_id)
                self._check_lease(conn, found, lease, running=False)  # an ended turn still logs its end
                before = found
            after = self._event(conn, before, kind, now, sink, detail=detail)
            conn.execute(_UPDATE_SESSION_ACTIVITY, _activity_values(after))
            return after

        return await self._write(fn)

    # --- helpers ---------------------------------------------------------------------------------------

    def _insert_ignore(self, table: Any) -> Any:
        """INSERT ... ON CONFLICT DO NOTHING, in the dialect at hand."""
        if self.db.dialect == "postgresql":
            return postgresql.insert(table).on_conflict_do_nothing()
        return sqlite.insert(table).on_conflict_do_nothing()

    def _lock_session(self, conn: Connection, session_id: str) -> Session:
        """Reads a session for a write; on PostgreSQL the row stays locked until the transaction ends
        (SQLite's writer already holds the database)."""
        stmt = _SESSION_BY_ID_FOR_UPDATE if self._for_update else _SESSION_BY_ID
        row = conn.execute(stmt, {"p_session_id": session_id}).first()
        if row is None:
            raise session_not_found(session_id)
        return _session_from_row(row)

    def _lock_session_pk(self, conn: Connection, pk: int) -> Session | None:
        """`_lock_session` by primary key; None when the row is gone."""
        stmt = _SESSION_BY_PK_FOR_UPDATE if self._for_update else _SESSION_BY_PK
        row = conn.execute(stmt, {"p_pk": pk}).first()
        return _session_from_row(row) if row is not None else None

    @staticmethod
    def _check_lease(conn: Connection, session: Session, lease: TurnLease, *, running: bool = True) -> None:
        """Refuses a turn's write into a session other than the one it started in (SESSION_NOT_FOUND), or
        once its lease ended (TURN_LOST; not checked with running=False). Run under the session's lock:
        whatever ends a lease (a clear, a restore, a delete, a take-over) holds that lock too."""
        row = conn.execute(_TURN_ROW, {"p_turn_id": lease.turn_id, "p_owner": lease.owner}).first()
        if row is None or row.session_pk != session.pk or session.pk != lease.session_pk:
            raise session_gone(session.session_id, lease.turn_id)
        if running and row.state != TurnState.RUNNING:
            raise turn_lost(session.session_id, lease.turn_id)

    def _save_session(self, conn: Connection, before: Session, after: Session) -> None:
        if after is before:
            return
        conn.execute(_UPDATE_SESSION, {"p_pk": after.pk, **_session_values(after)})
        if after.metadata != before.metadata:
            conn.execute(delete(session_labels).where(session_labels.c.session_pk == after.pk))
            self._insert_labels(conn, after.pk, after.metadata)

    @staticmethod
    def _insert_labels(conn: Connection, pk: int, metadata: Mapping[str, str]) -> None:
        if metadata:
            conn.execute(
                insert(session_labels),
                [{"session_pk": pk, "key": k, "value": v} for k, v in metadata.items()],
            )

    @staticmethod
    def _shared_key(scope: Scope, session: Session) -> tuple[int, str, str]:
        return int(scope), session.agent_id, session.user_id if scope is Scope.USER else ""

    def _with_shared(self, conn: Connection, session: Session) -> Session:
        """A session read in a write's transaction, with its `app:` and `user:` variables (one statement)."""
        keys = [self._shared_key(scope, session) for scope in Scope]
        return self._with_scopes(session, self._read_scopes(conn, keys))

    @staticmethod
    def _read_scopes(
        conn: Connection, keys: Sequence[tuple[int, str, str]]
    ) -> dict[tuple[int, str, str], Any]:
        """The variables of the shared scopes with these keys (`_shared_key`), in one statement."""
        if not keys:
            return {}
        rows = conn.execute(_SHARED_BY_KEYS, {"p_keys": list(keys)})
        return {(r.scope, r.agent_id, r.user_id): r.variables for r in rows}

    def _with_scopes(self, session: Session, scopes: Mapping[tuple[int, str, str], Any]) -> Session:
        """`session` with its `app:` and `user:` variables taken from `scopes` (`_read_scopes`)."""
        return session.evolve(
            shared={scope: scopes.get(self._shared_key(scope, session), {}) for scope in Scope}
        )

    def _write_shared(
        self, conn: Connection, session: Session, changes: ScopedChanges, now: datetime
    ) -> None:
        """Applies `changes` to the scopes of `session`'s agent and user."""
        self._store_shared(conn, self._apply_shared(conn, session, changes), now)

    def _apply_shared(
        self, conn: Connection, session: Session, changes: ScopedChanges
    ) -> list[tuple[tuple[int, str, str], Any, dict[str, Any]]]:
        """Reads every scope `changes` touch (locked on PostgreSQL) and applies them in memory, within the
        limits: (key, current variables or None, updated variables) per scope. Nothing is written, so a
        change that breaks a limit fails before any scope is changed."""
        out = []
        for scope in changes.scopes():
            key = self._shared_key(scope, session)
            params = {"p_scope": key[0], "p_agent_id": key[1], "p_user_id": key[2]}
            stmt = _SHARED_BY_KEY.with_for_update() if self._for_update else _SHARED_BY_KEY
            current = conn.execute(stmt, params).scalar_one_or_none()
            out.append((key, current, changes.apply(scope, current or {})))
        return out

    @staticmethod
    def _store_shared(
        conn: Connection, applied: Sequence[tuple[tuple[int, str, str], Any, dict[str, Any]]], now: datetime
    ) -> None:
        """Writes what `_apply_shared` computed (two first writers of one scope race on its primary key,
        and the loser runs again)."""
        for (scope_id, agent_id, user_id), current, updated in applied:
            where = (
                scoped_variables.c.scope == scope_id,
                scoped_variables.c.agent_id == agent_id,
                scoped_variables.c.user_id == user_id,
            )
            if current is None:
                if updated:
                    conn.execute(
                        insert(scoped_variables).values(
                            scope=scope_id,
                            agent_id=agent_id,
                            user_id=user_id,
                            variables=updated,
                            update_time=now,
                        )
                    )
            elif updated:
                conn.execute(
                    update(scoped_variables).where(*where).values(variables=updated, update_time=now)
                )
            else:
                conn.execute(delete(scoped_variables).where(*where))

    # --- agents ----------------------------------------------------------------------------------------

    async def ensure_agent(self, agent: Agent) -> Agent:
        """Inserts an agent unless one with its id exists (the built-in agents at start-up)."""

        def op(conn: Connection) -> Agent:
            conn.execute(self._insert_ignore(agents).values(agent_id=agent.agent_id, **_agent_values(agent)))
            row = (conn.execute(select(agents).where(agents.c.agent_id == agent.agent_id))).one()
            return _agent_from_row(row)

        return await self.db.write(op)

    async def create_agent(self, agent: Agent) -> Agent:
        def op(conn: Connection) -> Agent:
            found = (
                conn.execute(select(agents.c.agent_id).where(agents.c.agent_id == agent.agent_id))
            ).first()
            if found is not None:
                raise AlreadyExists(
                    f"agent {agent.agent_id!r} already exists",
                    reason="AGENT_ALREADY_EXISTS",
                    metadata={"agent_id": agent.agent_id},
                )
            conn.execute(insert(agents).values(agent_id=agent.agent_id, **_agent_values(agent)))
            return agent

        return await self.db.write(op)

    async def get_agent(self, agent_id: str) -> Agent:
        def op(conn: Connection) -> Agent:
            row = (conn.execute(select(agents).where(agents.c.agent_id == agent_id))).first()
            if row is None:
                raise agent_not_found(agent_id)
            return _agent_from_row(row)

        return await self.db.read(op)

    async def list_agents(self, *, after_id: str, limit: int) -> list[Agent]:
        def op(conn: Connection) -> list[Agent]:
            stmt = select(agents).where(agents.c.agent_id > after_id).order_by(agents.c.agent_id).limit(limit)
            return [_agent_from_row(r) for r in conn.execute(stmt)]

        return await self.db.read(op)

    async def update_agent(self, agent_id: str, change: Callable[[Agent], Agent]) -> Agent:
        def op(conn: Connection) -> Agent:
            stmt = select(agents).where(agents.c.agent_id == agent_id)
            if self._for_update:
                stmt = stmt.with_for_update()
            row = (conn.execute(stmt)).first()
            if row is None:
                raise agent_not_found(agent_id)
            updated = change(_agent_from_row(row))
            conn.execute(update(agents).where(agents.c.agent_id == agent_id).values(_agent_values(updated)))
            return updated

        return await self.db.write(op)

    async def delete_agent(self, agent_id: str, *, allow_missing: bool) -> None:
        def op(conn: Connection) -> None:
            row = (conn.execute(select(agents).where(agents.c.agent_id == agent_id))).first()
            if row is None:
                if allow_missing:
                    return
                raise agent_not_found(agent_id)
            if AgentOrigin(row._mapping["origin"]) is AgentOrigin.BUILT_IN:
                raise FailedPrecondition(
                    f"agent {agent_id!r} is built in and cannot be deleted",
                    reason="AGENT_BUILT_IN",
                    metadata={"agent_id": agent_id},
                )
            in_use = (conn.execute(select(exists().where(sessions.c.agent_id == agent_id)))).scalar()
            if in_use:
                raise FailedPrecondition(
                    f"agent {agent_id!r} still has sessions; delete them first",
                    reason="AGENT_IN_USE",
                    metadata={"agent_id": agent_id},
                )
            conn.execute(delete(scoped_variables).where(scoped_variables.c.agent_id == agent_id))
            conn.execute(delete(agents).where(agents.c.agent_id == agent_id))

        await self.db.write(op)

    # --- sessions --------------------------------------------------------------------------------------

    async def create_session(
        self, agent_id: str, build: Callable[[Agent], Session], *, shared: ScopedChanges | None = None
    ) -> tuple[Session, bool]:
        """Inserts the session `build` makes from its agent; returns (session, created). A request id seen
        before returns the session it created, and created=False. With `shared`, the shared variables it
        sets are written too, and the session comes back with its shared variables."""

        return await self.db.write(_CreateOp(self, agent_id, build, shared))  # type: ignore[no-any-return]

    def _create_one(self, conn: Connection, op: _CreateOp) -> tuple[Session, bool]:
        agent_row = conn.execute(_AGENT_BY_ID, {"p_agent_id": op.agent_id}).first()
        if agent_row is None:
            raise agent_not_found(op.agent_id)
        new = op.build(_agent_from_row(agent_row))
        if new.request_id:
            row = conn.execute(_SESSION_BY_REQUEST, {"p_request_id": new.request_id}).first()
            if row is not None:
                first = _session_from_row(row)
                return (self._with_shared(conn, first) if op.shared is not None else first), False
        if conn.execute(_SESSION_PK_BY_ID, {"p_session_id": new.session_id}).first() is not None:
            raise session_exists(new.session_id)
        # The shared scopes first: a change that breaks their limit fails before anything is written (the
        # grouped caller commits the others' creates with this one's error, so nothing may be left of it).
        applied = self._apply_shared(conn, new, op.shared) if op.shared is not None else None
        pk = conn.execute(_INSERT_SESSION, _new_session_values(new)).scalar_one()
        self._insert_labels(conn, pk, new.metadata)
        created = new.evolve(pk=pk)
        if applied is None:
            return created, True
        self._store_shared(conn, applied, new.create_time)
        return self._with_shared(conn, created), True

    def _create_many(self, conn: Connection, ops: Sequence[_CreateOp]) -> list[Outcome]:
        """Concurrent creates in a few statements for all of them: one SELECT each of their agents, of
        their request ids seen before and of their ids already taken, one INSERT (on PostgreSQL with
        RETURNING for the pks; on SQLite after one SELECT of the largest pk), one INSERT of labels, one
        SELECT of shared variables. The outcome of each is what running them one after the
        other would give. Creates that write shared variables run one by one first (in the same
        transaction), as the others' reads depend on them."""
        outcomes: list[Outcome | None] = [None] * len(ops)
        simple: list[int] = []
        for i, op in enumerate(ops):
            if op.shared:
                outcomes[i] = _outcome(functools.partial(self._create_one, conn, op))
            else:
                simple.append(i)
        agent_ids = list({ops[i].agent_id for i in simple})
        agents_by_id = (
            {r.agent_id: _agent_from_row(r) for r in conn.execute(_AGENTS_BY_IDS, {"p_ids": agent_ids})}
            if agent_ids
            else {}
        )
        built: list[tuple[int, Session]] = []
        for i in simple:
            agent = agents_by_id.get(ops[i].agent_id)
            if agent is None:
                outcomes[i] = (None, agent_not_found(ops[i].agent_id))
                continue
            outcome = _outcome(functools.partial(ops[i].build, agent))
            if outcome[1] is not None:
                outcomes[i] = outcome
            else:
                built.append((i, outcome[0]))
        request_ids = [new.request_id for _, new in built if new.request_id]
        seen_before = (
            {
                r.request_id: _session_from_row(r)
                for r in conn.execute(_SESSIONS_BY_REQUESTS, {"p_ids": request_ids})
            }
            if request_ids
            else {}
        )
        ids = [new.session_id for _, new in built]
        taken = {r.session_id for r in conn.execute(_SESSION_IDS_TAKEN, {"p_ids": ids})} if ids else set()
        fresh: list[tuple[int, Session]] = []
        first_of: dict[str, int] = {}  # request id -> the create of this group that makes its session
        answers: list[tuple[int, int | Session]] = []  # (op, its session or the op whose session it is)
        for i, new in built:
            if new.request_id in seen_before:
                answers.append((i, seen_before[new.request_id]))
            elif new.request_id in first_of:
                answers.append((i, first_of[new.request_id]))
            elif new.session_id in taken:
                outcomes[i] = (None, session_exists(new.session_id))
            else:
                taken.add(new.session_id)
                fresh.append((i, new))
                if new.request_id:
                    first_of[new.request_id] = i
        created: dict[int, Session] = {}
        if fresh and self.db.dialect == "sqlite":
            # The pks SQLite would choose (one past the largest, in order), chosen here: the driver's
            # executemany returns no rows. The writer holds the write lock, so nothing else inserts meanwhile.
            last = conn.execute(_LAST_SESSION_PK).scalar_one()
            created = {i: new.evolve(pk=last + k) for k, (i, new) in enumerate(fresh, start=1)}
            _SQLITE_INSERT_SESSIONS.run(
                conn, [{"pk": s.pk, **_new_session_values(s)} for s in created.values()]
            )
        elif fresh:
            rows = conn.execute(_INSERT_SESSIONS, [_new_session_values(new) for _, new in fresh]).all()
            created = {i: new.evolve(pk=row.pk) for (i, new), row in zip(fresh, rows, strict=True)}
        if fresh:
            labels = [
                {"session_pk": s.pk, "key": k, "value": v}
                for s in created.values()
                for k, v in s.metadata.items()
            ]
            if labels:
                conn.execute(insert(session_labels), labels)
        results = [(i, s, True) for i, s in created.items()]
        results += [(i, s if isinstance(s, Session) else created[s], False) for i, s in answers]
        keys = list(
            {
                self._shared_key(scope, s)
                for i, s, _ in results
                if ops[i].shared is not None
                for scope in Scope
            }
        )
        scopes = self._read_scopes(conn, keys)
        for i, s, made in results:
            outcomes[i] = ((self._with_scopes(s, scopes) if ops[i].shared is not None else s, made), None)
        assert all(o is not None for o in outcomes)
        return outcomes  # type: ignore[return-value]

    async def get_session(self, session_id: str) -> Session:
        def op(conn: Connection) -> Session:
            row = conn.execute(_SESSION_WITH_SHARED_BY_ID, {"p_session_id": session_id}).first()
            if row is None:
                raise session_not_found(session_id)
            return _session_with_shared(row)

        return await self.db.read(op)

    async def list_sessions(
        self, flt: SessionFilter, *, before_pk: int, limit: int, now: datetime
    ) -> list[Session]:
        """Newest first, strictly older than `before_pk` (0: from the newest)."""

        def op(conn: Connection) -> list[Session]:
            stmt: Select[Any] = select(sessions, *_SHARED_COLUMNS).select_from(_SESSIONS_WITH_SHARED)
            if before_pk:
                stmt = stmt.where(sessions.c.pk < before_pk)
            if flt.agent_id:
                stmt = stmt.where(sessions.c.agent_id == flt.agent_id)
            if flt.user_id:
                stmt = stmt.where(sessions.c.user_id == flt.user_id)
            if flt.status is Status.ENDED:
                stmt = stmt.where(sessions.c.end_time.is_not(None))
            elif flt.status is Status.EXPIRED:
                stmt = stmt.where(sessions.c.end_time.is_(None), sessions.c.expire_time <= now)
            elif flt.status is Status.ACTIVE:
                stmt = stmt.where(sessions.c.end_time.is_(None), sessions.c.expire_time > now)
            for key, value in (flt.metadata or {}).items():
                stmt = stmt.where(
                    exists().where(
                        and_(
                            session_labels.c.session_pk == sessions.c.pk,
                            session_labels.c.key == key,
                            session_labels.c.value == value,
                        )
                    )
                )
            stmt = stmt.order_by(sessions.c.pk.desc()).limit(limit)
            return [_session_with_shared(r) for r in conn.execute(stmt)]

        return await self.db.read(op, scan=True)

    async def change_session(
        self,
        session_id: str,
        change: Callable[[Session], Session],
        events: Callable[[Session, Session], Sequence[tuple[str, Mapping[str, Any]]]] = lambda b, a: (),
        *,
        now: datetime,
        shared: ScopedChanges | None = None,
        running_turns: list[str] | None = None,
        on_commit: Callable[[], None] | None = None,
    ) -> Session:
        """Read-modify-write of one session under its lock: `change` applies the domain rule and `events`
        names the events the change makes (kind, detail), stored in the same transaction. With `shared`,
        the shared variables it changes are written too (once `change` accepted the write), and the session
        comes back with its shared variables. `running_turns`, when given, receives the id of the turn
        running in the session when the change changed it; `on_commit` is called once it committed."""

        def fn(conn: Connection, sink: list[Any]) -> Session:
            before = self._lock_session(conn, session_id)
            after = change(before)
            if after is not before:
                for kind, detail in events(before, after):
                    after = self._event(conn, after, kind, now, sink, detail=detail)
                if running_turns is not None:
                    running_turns[:] = conn.execute(_RUNNING_TURN_IDS, {"p_pk": before.pk}).scalars().all()
            self._save_session(conn, before, after)
            if shared is None:
                return after
            self._write_shared(conn, after, shared, now)
            return self._with_shared(conn, after)

        return await self._write(fn, on_commit=on_commit)

    async def delete_session(
        self,
        session_id: str,
        *,
        etag: str,
        force: bool,
        allow_missing: bool,
        now: datetime,
        ended_turns: list[str] | None = None,
        on_commit: Callable[[], None] | None = None,
    ) -> bool:
        """Deletes a session with everything it holds. `ended_turns`, when given, receives the id of the
        turn that was running in it (its lease row goes with the session: the turn must be stopped), and
        `on_commit` is called once the delete committed."""
        ended: list[str] = ended_turns if ended_turns is not None else []

        def fn(conn: Connection, sink: list[Any]) -> bool:
            # Locked like any other write's read (on PostgreSQL): the etag and "active needs force" checks
            # must hold against a concurrent update or restore, not against the row as it was.
            stmt = _SESSION_BY_ID_FOR_UPDATE if self._for_update else _SESSION_BY_ID
            row = conn.execute(stmt, {"p_session_id": session_id}).first()
            if row is None:
                if allow_missing:
                    return False
                raise session_not_found(session_id)
            session = _session_from_row(row)
            if etag and etag != session.etag:
                raise etag_mismatch("session", etag, session.etag)
            if not force and session.status(now) is Status.ACTIVE:
                raise FailedPrecondition(
                    f"session {session_id!r} is active; end it first or delete with force",
                    reason="SESSION_ACTIVE",
                    metadata={"session_id": session_id},
                )
            ended[:] = conn.execute(_RUNNING_TURN_IDS, {"p_pk": session.pk}).scalars().all()
            # Children first: no reliance on ON DELETE CASCADE being enforced by the connection.
            for table in (messages, tool_calls, session_labels, session_events, turns):
                conn.execute(delete(table).where(table.c.session_pk == session.pk))
            conn.execute(delete(sessions).where(sessions.c.pk == session.pk))
            self._event(None, session, "deleted", now, sink)  # the log goes with the session: live only
            return True

        return await self._write(fn, on_commit=on_commit)

    # --- messages --------------------------------------------------------------------------------------

    async def append_messages(
        self,
        session_id: str,
        new_messages: Sequence[NewMessage],
        now: datetime,
        live: list[Any] | None = None,
        *,
        set_variables: Mapping[str, Any] | None = None,
        limits: Limits | None = None,
        lease: TurnLease | None = None,
    ) -> tuple[Session, list[StoredMessage]]:
        """Appends atomically with gap-free sequence numbers. Messages whose caller-chosen id is already
        stored are returned as stored and not appended again. `live`, when given, receives the live forms
        of the events published (the caller may build its answer from them instead of converting again).

        `set_variables` are set key by key in the same transaction when the append stores anything (a
        retry that finds every message stored sets nothing again), within `limits`.

        With `lease`, the append is a turn's own and holds to its lease (`TurnLease`). It may land in a
        session that expired while the turn ran (a turn that started in an active session keeps its
        answer), without renewing it: an expired session does not come back to life that way."""
        op = _AppendOp(self, session_id, new_messages, now, [], set_variables, limits, lease)
        result = await self.db.write(op)  # its events are published once it commits (`after_commit`)
        if live is not None:
            live.extend(op.events)
        return result

    async def append_each(
        self, entries: Sequence[AppendEntry], now: datetime, *, limits: Limits | None = None
    ) -> list[AppendResult]:
        """Each entry as `append_messages` would append it, all submitted at once (a
        BatchAppendMessages call): their appends join the same group commits, and each entry keeps its
        own outcome, with the live forms of its events."""
        ops = [
            _AppendOp(self, e.session_id, e.messages, now, [], e.set_variables or None, limits)
            for e in entries
        ]
        outcomes = await self.db.write_each(ops)
        return [AppendResult(result, exc, op.events) for op, (result, exc) in zip(ops, outcomes, strict=True)]

    def _append_many(self, conn: Connection, ops: Sequence[_AppendOp]) -> list[Outcome]:
        """Runs a group of appends with one SELECT, one INSERT and one UPDATE for all of them; the domain
        rules still apply request by request, in order, on the in-memory sessions."""
        cache: WriteCache | None = conn.info.get(WriteCache.KEY)
        state: dict[str, Session] = {}
        missing = []
        for session_id in {op.session_id for op in ops}:
            cached = cache.get(session_id) if cache is not None else None
            if cached is not None:
                state[session_id] = cached
            else:
                missing.append(session_id)
        if missing:
            stmt = _SESSIONS_BY_IDS.with_for_update() if self._for_update else _SESSIONS_BY_IDS
            rows = conn.execute(stmt, {"p_ids": missing})
            state.update((row.session_id, _session_from_row(row)) for row in rows)
        original = dict(state)
        known = self._stored_under_caller_ids(conn, ops, state)
        pending_messages: list[StoredMessage] = []
        pending_calls: list[dict[str, Any]] = []
        pending_events: list[dict[str, Any]] = []
        rewritten: set[str] = set()  # sessions whose variables changed: their whole row is written
        outcomes: list[Outcome] = []
        sqlite_rows = self.db.dialect == "sqlite"

        def flush() -> None:
            if pending_messages:
                rows = [_message_values(state[m.session_id].pk, m) for m in pending_messages]
                if sqlite_rows:
                    _SQLITE_INSERT_MESSAGES.run(conn, rows)
                else:
                    conn.execute(insert(messages), rows)
                pending_messages.clear()
            if pending_calls:
                conn.execute(self._record_calls, pending_calls)
                pending_calls.clear()
            if pending_events:
                if sqlite_rows:
                    _SQLITE_INSERT_EVENTS.run(conn, pending_events)
                else:
                    conn.execute(_INSERT_EVENT, pending_events)
                pending_events.clear()

        for op in ops:
            op.events.clear()  # a group that failed may run this operation again
            try:
                before = state.get(op.session_id)
                if before is None:
                    raise session_not_found(op.session_id)
                if op.lease is not None:
                    self._check_lease(conn, before, op.lease)
                existing: dict[str, StoredMessage] = {}
                for m in op.new_messages:
                    hit = known.get((op.session_id, m.message_id)) if m.caller_id else None
                    if hit is not None:
                        existing[m.message_id] = hit
                fresh = [m for m in op.new_messages if m.message_id not in existing]
                if not fresh:
                    outcomes.append(((before, sorted(existing.values(), key=_by_sequence)), None))
                    continue
                active = before.status(op.now) is Status.ACTIVE
                if op.lease is None or before.end_time is not None:
                    model.ensure_writable(before, op.now)
                own, shared = self._set_variables(conn, before, op)  # may refuse: before anything is queued
                if any(m.tool_result_ids for m in fresh):
                    flush()  # results are tied to calls that may be pending in this group
                stored, calls = self._build_messages(conn, before, fresh, op.now)
                pending_messages.extend(stored)
                pending_calls.extend(calls)
                for m, kept in zip(fresh, stored, strict=True):
                    if m.caller_id:
                        known[(op.session_id, m.message_id)] = kept
                counts = {
                    "last_sequence": before.last_sequence + len(fresh),
                    "message_count": before.message_count + len(fresh),
                }
                after = (
                    model.record_activity(before, op.now, **counts)
                    if active
                    else before.evolve(update_time=op.now, version=before.version + 1, **counts)
                )
                detail = {"first_sequence": stored[0].sequence, "last_sequence": stored[-1].sequence}
                after = self._event(
                    None,
                    after,
                    "messages_appended",
                    op.now,
                    op.events,
                    detail=detail,
                    messages_=stored,
                    pending=pending_events,
                )
                if own is not None:  # as UpdateSession: shared keys alone keep the etag
                    after = after.evolve(variables=own, update_time=op.now, version=after.version + 1)
                    after = self._event(
                        None,
                        after,
                        "updated",
                        op.now,
                        op.events,
                        detail={"paths": ["variables"]},
                        pending=pending_events,
                    )
                    rewritten.add(op.session_id)
                if shared:
                    self._store_shared(conn, shared, op.now)
                state[op.session_id] = after
                outcomes.append(
                    ((state[op.session_id], sorted([*existing.values(), *stored], key=_by_sequence)), None)
                )
            except DomainError as exc:
                outcomes.append((None, exc))
        flush()
        changed = [s for sid, s in state.items() if s is not original[sid] and sid not in rewritten]
        if changed and sqlite_rows:
            _SQLITE_UPDATE_ACTIVITY.run(conn, [_activity_values(s) for s in changed])
        elif changed:
            conn.execute(_UPDATE_SESSION_ACTIVITY, [_activity_values(s) for s in changed])
        if rewritten:
            values = [{"p_pk": state[sid].pk, **_session_values(state[sid])} for sid in rewritten]
            conn.execute(_UPDATE_SESSION, values)
        if cache is not None:
            for session_id, session in state.items():
                cache.stage(session_id, session)
        return outcomes

    def _set_variables(
        self, conn: Connection, session: Session, op: _AppendOp
    ) -> tuple[dict[str, Any] | None, list[Any]]:
        """What an append's `set_variables` do: the session's own variables when they change (None when
        they do not), and the shared scopes applied (`_apply_shared`). Refuses, writing nothing, when
        either would break the size limit of a variables object."""
        if op.set_variables is None:
            return None, []
        assert op.limits is not None
        own, shared = state.patch(session.variables, frozenset(op.set_variables), op.set_variables)
        if own == session.variables:
            changed = None
        else:
            check_variables(own, op.limits, "set_variables")
            changed = own
        applied = self._apply_shared(conn, session, replace(shared, limits=op.limits)) if shared else []
        return changed, applied

    def _stored_under_caller_ids(
        self, conn: Connection, ops: Sequence[_AppendOp], state: Mapping[str, Session]
    ) -> dict[tuple[str, str], StoredMessage]:
        """The messages already stored under the ids callers chose (retries), by (session id, message id):
        one statement for the whole group. The group then adds what it stores itself, so a retry that
        lands in the same group as its original finds it."""
        keys = [
            (state[op.session_id].pk, m.message_id)
            for op in ops
            if op.session_id in state
            for m in op.new_messages
            if m.caller_id
        ]
        if not keys:
            return {}
        if self.db.dialect == "postgresql":
            params: dict[str, Any] = {"p_pks": [k[0] for k in keys], "p_ids": [k[1] for k in keys]}
        else:
            params = {"p_keys": json.dumps(keys)}
        session_ids = {s.pk: session_id for session_id, s in state.items()}
        known: dict[tuple[str, str], StoredMessage] = {}
        for row in conn.execute(_MESSAGES_BY_KEYS[self.db.dialect], params):
            session_id = session_ids[row[0]]
            known[(session_id, row.message_id)] = _message_from_row(row[1:], session_id)
        return known

    @staticmethod
    def _link_groups(
        conn: Connection, session_pk: int, fresh: Sequence[NewMessage], first: int
    ) -> tuple[list[int], list[int]]:
        """Ties each new tool result to its call: returns group_start and group_end for the new messages
        and widens group_end of the stored messages holding the calls."""
        starts = [first + i for i in range(len(fresh))]
        if not any(m.tool_result_ids or m.tool_call_ids for m in fresh):
            return starts, list(starts)  # no tool calls or results: each message is its own group
        wanted = {cid for m in fresh for cid in m.tool_result_ids}
        latest: dict[str, int] = {}  # call id -> sequence of its newest call so far
        if wanted:
            rows = conn.execute(
                select(tool_calls.c.call_id, tool_calls.c.sequence).where(
                    tool_calls.c.session_pk == session_pk, tool_calls.c.call_id.in_(wanted)
                )
            )
            latest = {r.call_id: r.sequence for r in rows}
        ends = list(starts)
        widen: dict[int, int] = {}
        for i, m in enumerate(fresh):
            seq = first + i
            for cid in m.tool_result_ids:
                call_seq = latest.get(cid)
                if call_seq is None or call_seq > seq:
                    continue
                starts[i] = min(starts[i], call_seq)
                if call_seq >= first:
                    ends[call_seq - first] = max(ends[call_seq - first], seq)
                else:
                    widen[call_seq] = max(widen.get(call_seq, call_seq), seq)
            for cid in m.tool_call_ids:
                latest[cid] = seq
        for call_seq, end in widen.items():
            conn.execute(
                update(messages)
                .where(messages.c.session_pk == session_pk, messages.c.sequence == call_seq)
                .values(group_end=end)
            )
        return starts, ends

    def _build_messages(
        self, conn: Connection, session: Session, fresh: Sequence[NewMessage], now: datetime
    ) -> tuple[list[StoredMessage], list[dict[str, Any]]]:
        """Numbers new messages after the session's last sequence; returns them and their tool-call rows."""
        first = session.last_sequence + 1
        starts, ends = self._link_groups(conn, session.pk, fresh, first)
        stored = [
            StoredMessage(
                session_id=session.session_id,
                sequence=first + i,
                message_id=m.message_id,
                role=m.role,
                content=m.content,
                hidden=m.hidden,
                metadata=m.metadata,
                status=m.status,
                turn_id=m.turn_id,
                create_time=now,
                group_start=starts[i],
                group_end=ends[i],
            )
            for i, m in enumerate(fresh)
        ]
        calls = [
            {"session_pk": session.pk, "call_id": call_id, "sequence": first + i}
            for i, m in enumerate(fresh)
            for call_id in m.tool_call_ids
        ]
        return stored, calls

    def _insert_messages(
        self, conn: Connection, session: Session, fresh: Sequence[NewMessage], now: datetime
    ) -> list[StoredMessage]:
        stored, calls = self._build_messages(conn, session, fresh, now)
        conn.execute(insert(messages), [_message_values(session.pk, m) for m in stored])
        if calls:
            conn.execute(self._record_calls, calls)
        return stored

    async def list_messages(self, session_id: str, q: MessagePageQuery) -> list[StoredMessage]:
        """One page plus one look-ahead row, in the page's order (the service layer trims it so that a
        tool call and its results stay together). One statement; a second only when the page is empty,
        to tell an empty history from a missing session."""

        def op(conn: Connection) -> list[StoredMessage]:
            rows = _page_of_messages(conn, session_id, q)
            if not rows and conn.execute(_SESSION_PK_BY_ID, {"p_session_id": session_id}).first() is None:
                raise session_not_found(session_id)
            return rows

        return await self.db.read(op)

    async def session_and_messages(
        self, session_id: str, q: MessagePageQuery
    ) -> tuple[Session, list[StoredMessage]]:
        """The session (as `get_session` reads it) and a page of its messages, in one read."""

        def op(conn: Connection) -> tuple[Session, list[StoredMessage]]:
            row = conn.execute(_SESSION_WITH_SHARED_BY_ID, {"p_session_id": session_id}).first()
            if row is None:
                raise session_not_found(session_id)
            return _session_with_shared(row), _page_of_messages(conn, session_id, q)

        return await self.db.read(op)

    async def delete_messages(
        self,
        session_id: str,
        *,
        message_id: str | None,
        after_sequence: int | None,
        now: datetime,
        turn_id: str | None = None,
        lease: TurnLease | None = None,
    ) -> tuple[Session, list[str]]:
        """Deletes one message, or those above `after_sequence` (only turn `turn_id`'s when given: a
        turn's messages all sit above its start, so the key's range finds them without a scan). With
        `lease`, the delete is a turn's own (a rollback) and holds to its lease (`TurnLease`)."""

        def fn(conn: Connection, sink: list[Any]) -> tuple[Session, list[str]]:
            before = self._lock_session(conn, session_id)
            if lease is not None:
                self._check_lease(conn, before, lease)
            model.ensure_writable(before, now)
            cond = [messages.c.session_pk == before.pk]
            if message_id is not None:
                cond.append(messages.c.message_id == message_id)
            else:
                cond.append(messages.c.sequence > (after_sequence or 0))
                if turn_id is not None:
                    cond.append(messages.c.turn_id == turn_id)
            rows = (conn.execute(select(messages.c.message_id, messages.c.sequence).where(*cond))).all()
            if message_id is not None and not rows:
                raise NotFound(
                    f"message {message_id!r} does not exist in session {session_id!r}",
                    reason="MESSAGE_NOT_FOUND",
                    metadata={"session_id": session_id, "message_id": message_id},
                )
            if not rows:
                return before, []
            conn.execute(delete(messages).where(*cond))
            sequences = [r.sequence for r in rows]
            conn.execute(
                delete(tool_calls).where(
                    tool_calls.c.session_pk == before.pk, tool_calls.c.sequence.in_(sequences)
                )
            )
            after = replace(
                before,
                message_count=before.message_count - len(rows),
                update_time=now,
                version=before.version + 1,
            )
            deleted = [r.message_id for r in rows]
            detail = {"message_ids": deleted, "after_sequence": 0 if turn_id else after_sequence or 0}
            after = self._event(conn, after, "messages_deleted", now, sink, detail=detail)
            self._save_session(conn, before, after)
            return after, deleted

        return await self._write(fn)

    async def clear_session(
        self,
        session_id: str,
        now: datetime,
        ended_turns: list[str] | None = None,
        on_commit: Callable[[], None] | None = None,
    ) -> Session:
        """Empties the history (the session is left expired) and ends the lease of the turn running in it:
        nothing that turn still produces lands in the session. `ended_turns`, when given, receives its
        id, for `on_commit` to stop it once the clear committed."""
        ended: list[str] = ended_turns if ended_turns is not None else []

        def fn(conn: Connection, sink: list[Any]) -> Session:
            before = self._lock_session(conn, session_id)
            after = model.clear(before, now)
            ended[:] = conn.execute(_END_RUNNING_TURNS, {"p_pk": before.pk, "p_now": now}).scalars().all()
            conn.execute(_CLOSE_OPEN_PAUSE, {"p_pk": before.pk})
            if after is not before:
                conn.execute(delete(messages).where(messages.c.session_pk == before.pk))
                conn.execute(delete(tool_calls).where(tool_calls.c.session_pk == before.pk))
                after = self._event(conn, after, "cleared", now, sink)
            self._save_session(conn, before, after)
            return after

        return await self._write(fn, on_commit=on_commit)

    async def restore_session(
        self,
        session_id: str,
        history: Sequence[NewMessage],
        now: datetime,
        ended_turns: list[str] | None = None,
        on_commit: Callable[[], None] | None = None,
    ) -> tuple[Session, bool]:
        """Replaces the history of an expired session and starts a new life for it, ending the lease of a
        turn still running from the old one (`ended_turns` receives its id, as with `clear_session`). An
        active session is returned unchanged (restored=False)."""
        ended: list[str] = ended_turns if ended_turns is not None else []

        def fn(conn: Connection, sink: list[Any]) -> tuple[Session, bool]:
            before = self._lock_session(conn, session_id)
            ended.clear()
            if before.status(now) is Status.ACTIVE:
                return before, False
            after = model.restore(before, len(history), now)
            ended[:] = conn.execute(_END_RUNNING_TURNS, {"p_pk": before.pk, "p_now": now}).scalars().all()
            conn.execute(_CLOSE_OPEN_PAUSE, {"p_pk": before.pk})
            conn.execute(delete(messages).where(messages.c.session_pk == before.pk))
            conn.execute(delete(tool_calls).where(tool_calls.c.session_pk == before.pk))
            if history:
                self._insert_messages(conn, before, history, now)
            after = replace(after, last_sequence=before.last_sequence + len(history))
            after = self._event(conn, after, "restored", now, sink, detail={"message_count": len(history)})
            self._save_session(conn, before, after)
            return after, True

        return await self._write(fn, on_commit=on_commit)

    # --- sweeper ---------------------------------------------------------------------------------------

    async def push_due_notices(
        self, now: datetime, *, limit: int, after: SweepCursor = SWEEP_START
    ) -> tuple[int, SweepCursor]:
        """Pushes the expiry warnings and expiries due at `now` for up to `limit` sessions past `after`, in
        one transaction. Returns how many sessions it looked at (fewer than `limit`: nothing more is due)
        and the cursor for the next batch of the same pass. On PostgreSQL, rows another sweeper holds are
        skipped, so no event is ever pushed twice. A notice never makes a session due again in the same
        pass (a warning moves it to its expiry, an expiry to nothing), so the cursor only moves forward."""

        def fn(conn: Connection, sink: list[Any]) -> tuple[int, SweepCursor]:
            stmt = _DUE_NOTICES.with_for_update(skip_locked=True) if self._for_update else _DUE_NOTICES
            params = {"p_now": now, "p_limit": limit, "p_after_time": after[0], "p_after_pk": after[1]}
            rows = conn.execute(stmt, params).all()
            pending: list[dict[str, Any]] = []
            updates = []
            for row in rows:
                session, notice = model.due_notice(_session_from_row(row), now)
                if notice is not None:
                    session = self._event(None, session, notice.value, now, sink, pending=pending)
                updates.append(
                    {
                        "p_pk": session.pk,
                        "last_event_id": session.last_event_id,
                        "warned_expire_time": session.warned_expire_time,
                        "notified_expire_time": session.notified_expire_time,
                        "next_notify_time": session.next_notify_time,
                    }
                )
            if pending:
                conn.execute(_INSERT_EVENT, pending)
            if updates:
                conn.execute(_UPDATE_NOTICES, updates)
            cursor = (rows[-1].next_notify_time, rows[-1].pk) if rows else after
            return len(rows), cursor

        return await self._write(fn)

    async def purge(
        self, cutoff: datetime, *, ended: bool, limit: int, now: datetime, after: SweepCursor = SWEEP_START
    ) -> tuple[int, SweepCursor]:
        """Deletes up to `limit` sessions past `after` that ended (or, with ended=False, expired) before
        `cutoff`, with their messages and events. Returns how many it deleted (fewer than `limit`: none is
        left) and the cursor for the next batch. Each purged session's watchers get its `deleted` event
        (live only, as for DeleteSession), once it committed."""

        def fn(conn: Connection, sink: list[Any]) -> tuple[int, SweepCursor]:
            stmt = _PURGE_ENDED if ended else _PURGE_EXPIRED
            if self._for_update:
                stmt = stmt.with_for_update(skip_locked=True)
            params = {"p_cutoff": cutoff, "p_limit": limit, "p_after_time": after[0], "p_after_pk": after[1]}
            rows = conn.execute(stmt, params).all()
            pks = [r.pk for r in rows]
            if pks:
                for table in (messages, tool_calls, session_labels, session_events, turns):
                    conn.execute(delete(table).where(table.c.session_pk.in_(pks)))
                conn.execute(delete(sessions).where(sessions.c.pk.in_(pks)))
            for row in rows:
                self._event(None, _session_from_row(row), "deleted", now, sink)
            return len(pks), ((rows[-1].at, rows[-1].pk) if rows else after)

        return await self._write(fn)

    async def count_sessions(self, now: datetime) -> dict[str, int]:
        def op(conn: Connection) -> dict[str, int]:
            ended = sessions.c.end_time.is_not(None)
            live = sessions.c.end_time.is_(None)
            stmt = select(
                func.count().filter(live, sessions.c.expire_time > now).label("active"),
                func.count()
                .filter(live, sessions.c.expire_time > now, sessions.c.warn_time < now)
                .label("expiring_soon"),
                func.count().filter(live, sessions.c.expire_time <= now).label("expired"),
                func.count().filter(ended).label("ended"),
            )
            row = (conn.execute(stmt)).one()
            return dict(row._mapping)

        return await self.db.read(op, scan=True)


def _message_values(session_pk: int, m: StoredMessage) -> dict[str, Any]:
    return {
        "session_pk": session_pk,
        "sequence": m.sequence,
        "message_id": m.message_id,
        "role": int(m.role),
        "content": m.content,
        "hidden": m.hidden,
        "metadata": m.metadata,
        "status": int(m.status),
        "turn_id": m.turn_id,
        "create_time": m.create_time,
        "group_start": m.group_start,
        "group_end": m.group_end,
    }


def _agent_values(a: Agent) -> dict[str, Any]:
    return {
        "display_name": a.display_name,
        "backend": a.backend,
        "timeout_defaults": a.timeout_defaults.as_dict(),
        "history_window": a.history_window,
        "origin": int(a.origin),
        "create_time": a.create_time,
        "update_time": a.update_time,
        "version": a.version,
    }


def _outcome(fn: Callable[[], T]) -> Outcome:
    """`fn()` as an outcome: a caller's own (domain) error is its outcome; anything else fails the group."""
    try:
        return fn(), None
    except DomainError as exc:
        return None, exc


def _new_session_values(new: Session) -> dict[str, Any]:
    values = _session_values(new)
    values.update(
        session_id=new.session_id,
        agent_id=new.agent_id,
        user_id=new.user_id,
        create_time=new.create_time,
        request_id=new.request_id,
        incarnation=new.incarnation,
    )
    return values


@dataclass(frozen=True)
class _CreateOp:
    """One CreateSession. Concurrent ones are written together: see `Store._create_many`."""

    store: Store
    agent_id: str
    build: Callable[[Agent], Session]
    shared: ScopedChanges | None

    def __call__(self, conn: Connection) -> tuple[Session, bool]:
        return self.store._create_one(conn, self)

    @staticmethod
    def run_many(conn: Connection, ops: Sequence[_CreateOp]) -> list[Outcome]:
        return ops[0].store._create_many(conn, ops)


def _by_sequence(m: StoredMessage) -> int:
    return m.sequence


class AppendEntry(NamedTuple):
    """One append of `Store.append_each`."""

    session_id: str
    messages: Sequence[NewMessage]
    set_variables: Mapping[str, Any] | None = None


class AppendResult(NamedTuple):
    """One entry's outcome in `Store.append_each`: `result` (the session, the messages as stored) when
    it landed, else `error`; `live`: its events as published."""

    result: tuple[Session, list[StoredMessage]] | None
    error: BaseException | None
    live: list[Any]


@dataclass(frozen=True)
class _AppendOp:
    """One AppendMessages request. Concurrent ones are written together: see `Store._append_many`."""

    store: Store
    session_id: str
    new_messages: Sequence[NewMessage]
    now: datetime
    events: list[Any]  # live forms of this append's events, published once the group commits
    set_variables: Mapping[str, Any] | None = None
    limits: Limits | None = None  # of variables objects, with `set_variables`
    lease: TurnLease | None = None  # a turn's own append (`Store.append_messages`)

    def __call__(self, conn: Connection) -> tuple[Session, list[StoredMessage]]:
        ((result, exc),) = self.run_many(conn, [self])
        if exc is not None:
            raise exc
        return result  # type: ignore[no-any-return]

    @staticmethod
    def run_many(conn: Connection, ops: Sequence[_AppendOp]) -> list[Outcome]:
        return ops[0].store._append_many(conn, ops)

    def after_commit(self) -> None:
        self.store._deliver(self.events)


class _Write:
    """A write of `Store._write`: `fn` with the list its events go to, published once it commits."""

    def __init__(
        self, store: Store, fn: Callable[[Connection, list[Any]], Any], on_commit: Callable[[], None] | None
    ) -> None:
        self.store = store
        self.fn = fn
        self.on_commit = on_commit
        self.sink: list[Any] = []

    def __call__(self, conn: Connection) -> Any:
        self.sink.clear()  # a group that failed may run this operation again
        return self.fn(conn, self.sink)

    def after_commit(self) -> None:
        self.store._deliver(self.sink)
        if self.on_commit is not None:
            self.on_commit()
