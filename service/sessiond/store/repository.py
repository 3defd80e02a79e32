"""The storage adapter: domain objects in, domain objects out. Rows never leave this module.

Every write is one transaction run through `Database.write`, so a change and its counters commit together
or not at all. Hot paths use Core statements; the statements a list or a page runs each have an index.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Row, and_, delete, exists, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Select

from ..domain import model
from ..domain.agents import Agent, AgentOrigin
from ..domain.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    agent_not_found,
    etag_mismatch,
    session_not_found,
)
from ..domain.model import NewMessage, Session, Status, StoredMessage
from ..domain.policy import EffectivePolicy, Source, TimeoutPolicy
from .database import Database
from .tables import agents, messages, session_labels, sessions, tool_calls


@dataclass(frozen=True)
class SessionFilter:
    agent_id: str = ""
    user_id: str = ""
    status: Status | None = None
    metadata: Mapping[str, str] | None = None


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
    )


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
        "warn_time": s.expire_time - s.effective.warning_threshold,
        "end_time": s.end_time,
        "renewal_count": s.renewal_count,
        "message_count": s.message_count,
        "last_sequence": s.last_sequence,
        "version": s.version,
    }


def _message_from_row(row: Row[Any], session_id: str) -> StoredMessage:
    m = row._mapping
    return StoredMessage(
        session_id=session_id,
        sequence=m["sequence"],
        message_id=m["message_id"],
        role=model.Role(m["role"]),
        content=m["content"],
        hidden=m["hidden"],
        metadata=m["metadata"],
        status=model.MessageStatus(m["status"]),
        turn_id=m["turn_id"],
        create_time=m["create_time"],
        group_start=m["group_start"],
        group_end=m["group_end"],
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


class Store:
    """Sessions, messages and agents, on SQLite or PostgreSQL."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._for_update = db.dialect == "postgresql"

    # --- helpers ---------------------------------------------------------------------------------------

    def _insert_ignore(self, table: Any) -> Any:
        """INSERT ... ON CONFLICT DO NOTHING, in the dialect at hand."""
        if self.db.dialect == "postgresql":
            return postgresql.insert(table).on_conflict_do_nothing()
        return sqlite.insert(table).on_conflict_do_nothing()

    async def _lock_session(self, conn: AsyncConnection, session_id: str) -> Session:
        """Reads a session for a write; on PostgreSQL the row stays locked until the transaction ends
        (SQLite's writer already holds the database)."""
        stmt = select(sessions).where(sessions.c.session_id == session_id)
        if self._for_update:
            stmt = stmt.with_for_update()
        row = (await conn.execute(stmt)).first()
        if row is None:
            raise session_not_found(session_id)
        return _session_from_row(row)

    async def _save_session(self, conn: AsyncConnection, before: Session, after: Session) -> None:
        if after is before:
            return
        await conn.execute(update(sessions).where(sessions.c.pk == after.pk).values(_session_values(after)))
        if after.metadata != before.metadata:
            await conn.execute(delete(session_labels).where(session_labels.c.session_pk == after.pk))
            await self._insert_labels(conn, after.pk, after.metadata)

    @staticmethod
    async def _insert_labels(conn: AsyncConnection, pk: int, metadata: Mapping[str, str]) -> None:
        if metadata:
            await conn.execute(
                insert(session_labels),
                [{"session_pk": pk, "key": k, "value": v} for k, v in metadata.items()],
            )

    # --- agents ----------------------------------------------------------------------------------------

    async def ensure_agent(self, agent: Agent) -> Agent:
        """Inserts an agent unless one with its id exists (the built-in agents at start-up)."""

        async def op(conn: AsyncConnection) -> Agent:
            await conn.execute(
                self._insert_ignore(agents).values(agent_id=agent.agent_id, **_agent_values(agent))
            )
            row = (await conn.execute(select(agents).where(agents.c.agent_id == agent.agent_id))).one()
            return _agent_from_row(row)

        return await self.db.write(op)

    async def create_agent(self, agent: Agent) -> Agent:
        async def op(conn: AsyncConnection) -> Agent:
            found = (
                await conn.execute(select(agents.c.agent_id).where(agents.c.agent_id == agent.agent_id))
            ).first()
            if found is not None:
                raise AlreadyExists(
                    f"agent {agent.agent_id!r} already exists",
                    reason="AGENT_ALREADY_EXISTS",
                    metadata={"agent_id": agent.agent_id},
                )
            await conn.execute(insert(agents).values(agent_id=agent.agent_id, **_agent_values(agent)))
            return agent

        return await self.db.write(op)

    async def get_agent(self, agent_id: str) -> Agent:
        async def op(conn: AsyncConnection) -> Agent:
            row = (await conn.execute(select(agents).where(agents.c.agent_id == agent_id))).first()
            if row is None:
                raise agent_not_found(agent_id)
            return _agent_from_row(row)

        return await self.db.read(op)

    async def list_agents(self, *, after_id: str, limit: int) -> list[Agent]:
        async def op(conn: AsyncConnection) -> list[Agent]:
            stmt = select(agents).where(agents.c.agent_id > after_id).order_by(agents.c.agent_id).limit(limit)
            return [_agent_from_row(r) for r in await conn.execute(stmt)]

        return await self.db.read(op)

    async def update_agent(self, agent_id: str, change: Callable[[Agent], Agent]) -> Agent:
        async def op(conn: AsyncConnection) -> Agent:
            stmt = select(agents).where(agents.c.agent_id == agent_id)
            if self._for_update:
                stmt = stmt.with_for_update()
            row = (await conn.execute(stmt)).first()
            if row is None:
                raise agent_not_found(agent_id)
            updated = change(_agent_from_row(row))
            await conn.execute(
                update(agents).where(agents.c.agent_id == agent_id).values(_agent_values(updated))
            )
            return updated

        return await self.db.write(op)

    async def delete_agent(self, agent_id: str, *, allow_missing: bool) -> None:
        async def op(conn: AsyncConnection) -> None:
            row = (await conn.execute(select(agents).where(agents.c.agent_id == agent_id))).first()
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
            in_use = (await conn.execute(select(exists().where(sessions.c.agent_id == agent_id)))).scalar()
            if in_use:
                raise FailedPrecondition(
                    f"agent {agent_id!r} still has sessions; delete them first",
                    reason="AGENT_IN_USE",
                    metadata={"agent_id": agent_id},
                )
            await conn.execute(delete(agents).where(agents.c.agent_id == agent_id))

        await self.db.write(op)

    # --- sessions --------------------------------------------------------------------------------------

    async def create_session(self, agent_id: str, build: Callable[[Agent], Session]) -> tuple[Session, bool]:
        """Inserts the session `build` makes from its agent; returns (session, created). A request id seen
        before returns the session it created, and created=False."""

        async def op(conn: AsyncConnection) -> tuple[Session, bool]:
            agent_row = (await conn.execute(select(agents).where(agents.c.agent_id == agent_id))).first()
            if agent_row is None:
                raise agent_not_found(agent_id)
            new = build(_agent_from_row(agent_row))
            if new.request_id:
                row = (
                    await conn.execute(select(sessions).where(sessions.c.request_id == new.request_id))
                ).first()
                if row is not None:
                    return _session_from_row(row), False
            taken = (
                await conn.execute(select(sessions.c.pk).where(sessions.c.session_id == new.session_id))
            ).first()
            if taken is not None:
                raise AlreadyExists(
                    f"session {new.session_id!r} already exists",
                    reason="SESSION_ALREADY_EXISTS",
                    metadata={"session_id": new.session_id},
                )
            values = _session_values(new)
            values.update(
                session_id=new.session_id,
                agent_id=new.agent_id,
                user_id=new.user_id,
                create_time=new.create_time,
                request_id=new.request_id,
            )
            pk = (await conn.execute(insert(sessions).values(values).returning(sessions.c.pk))).scalar_one()
            await self._insert_labels(conn, pk, new.metadata)
            return replace(new, pk=pk), True

        return await self.db.write(op)

    async def get_session(self, session_id: str) -> Session:
        async def op(conn: AsyncConnection) -> Session:
            row = (await conn.execute(select(sessions).where(sessions.c.session_id == session_id))).first()
            if row is None:
                raise session_not_found(session_id)
            return _session_from_row(row)

        return await self.db.read(op)

    async def list_sessions(
        self, flt: SessionFilter, *, before_pk: int, limit: int, now: datetime
    ) -> list[Session]:
        """Newest first, strictly older than `before_pk` (0: from the newest)."""

        async def op(conn: AsyncConnection) -> list[Session]:
            stmt: Select[Any] = select(sessions)
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
            return [_session_from_row(r) for r in await conn.execute(stmt)]

        return await self.db.read(op)

    async def change_session(self, session_id: str, change: Callable[[Session], Session]) -> Session:
        """Read-modify-write of one session under its lock; `change` applies the domain rule."""

        async def op(conn: AsyncConnection) -> Session:
            before = await self._lock_session(conn, session_id)
            after = change(before)
            await self._save_session(conn, before, after)
            return after

        return await self.db.write(op)

    async def delete_session(
        self, session_id: str, *, etag: str, force: bool, allow_missing: bool, now: datetime
    ) -> bool:
        async def op(conn: AsyncConnection) -> bool:
            stmt = select(sessions).where(sessions.c.session_id == session_id)
            row = (await conn.execute(stmt)).first()
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
            # Children first: no reliance on ON DELETE CASCADE being enforced by the connection.
            for table in (messages, tool_calls, session_labels):
                await conn.execute(delete(table).where(table.c.session_pk == session.pk))
            await conn.execute(delete(sessions).where(sessions.c.pk == session.pk))
            return True

        return await self.db.write(op)

    # --- messages --------------------------------------------------------------------------------------

    async def append_messages(
        self, session_id: str, new_messages: Sequence[NewMessage], now: datetime
    ) -> tuple[Session, list[StoredMessage]]:
        """Appends atomically with gap-free sequence numbers. Messages whose caller-chosen id is already
        stored are returned as stored and not appended again."""

        async def op(conn: AsyncConnection) -> tuple[Session, list[StoredMessage]]:
            before = await self._lock_session(conn, session_id)
            existing: dict[str, StoredMessage] = {}
            caller_ids = [m.message_id for m in new_messages if m.caller_id]
            if caller_ids:
                rows = await conn.execute(
                    select(*_MESSAGE_COLUMNS).where(
                        messages.c.session_pk == before.pk, messages.c.message_id.in_(caller_ids)
                    )
                )
                existing = {r.message_id: _message_from_row(r, session_id) for r in rows}
            fresh = [m for m in new_messages if m.message_id not in existing]
            if not fresh:
                return before, sorted(existing.values(), key=lambda m: m.sequence)
            model.ensure_writable(before, now)
            after = model.record_activity(before, now)
            stored = await self._insert_messages(conn, before, fresh, now)
            after = replace(
                after,
                last_sequence=before.last_sequence + len(fresh),
                message_count=before.message_count + len(fresh),
            )
            await self._save_session(conn, before, after)
            return after, sorted([*existing.values(), *stored], key=lambda m: m.sequence)

        return await self.db.write(op)

    @staticmethod
    async def _link_groups(
        conn: AsyncConnection, session_pk: int, fresh: Sequence[NewMessage], first: int
    ) -> tuple[list[int], list[int]]:
        """Ties each new tool result to its call: returns group_start and group_end for the new messages
        and widens group_end of the stored messages holding the calls."""
        in_batch = {cid: first + i for i, m in enumerate(fresh) for cid in m.tool_call_ids}
        missing = {cid for m in fresh for cid in m.tool_result_ids} - in_batch.keys()
        stored_at: dict[str, int] = {}
        if missing:
            rows = await conn.execute(
                select(tool_calls.c.call_id, tool_calls.c.sequence).where(
                    tool_calls.c.session_pk == session_pk, tool_calls.c.call_id.in_(missing)
                )
            )
            stored_at = {r.call_id: r.sequence for r in rows}
        starts = [first + i for i in range(len(fresh))]
        ends = list(starts)
        widen: dict[int, int] = {}
        for i, m in enumerate(fresh):
            seq = first + i
            for cid in m.tool_result_ids:
                call_seq = in_batch.get(cid, stored_at.get(cid))
                if call_seq is None or call_seq > seq:
                    continue
                starts[i] = min(starts[i], call_seq)
                if call_seq >= first:
                    ends[call_seq - first] = max(ends[call_seq - first], seq)
                else:
                    widen[call_seq] = max(widen.get(call_seq, call_seq), seq)
        for call_seq, end in widen.items():
            await conn.execute(
                update(messages)
                .where(messages.c.session_pk == session_pk, messages.c.sequence == call_seq)
                .values(group_end=end)
            )
        return starts, ends

    async def _insert_messages(
        self, conn: AsyncConnection, session: Session, fresh: Sequence[NewMessage], now: datetime
    ) -> list[StoredMessage]:
        first = session.last_sequence + 1
        starts, ends = await self._link_groups(conn, session.pk, fresh, first)
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
        await conn.execute(insert(messages), [_message_values(session.pk, m) for m in stored])
        calls = [
            {"session_pk": session.pk, "call_id": call_id, "sequence": first + i}
            for i, m in enumerate(fresh)
            for call_id in m.tool_call_ids
        ]
        if calls:
            await conn.execute(self._insert_ignore(tool_calls), calls)
        return stored

    async def list_messages(
        self, session_id: str, q: MessagePageQuery
    ) -> tuple[Session, list[StoredMessage]]:
        """One page plus one look-ahead row, in the page's order: the service layer trims it so that a
        tool call and its result stay together."""

        async def op(conn: AsyncConnection) -> tuple[Session, list[StoredMessage]]:
            row = (await conn.execute(select(sessions).where(sessions.c.session_id == session_id))).first()
            if row is None:
                raise session_not_found(session_id)
            session = _session_from_row(row)
            stmt = select(*_MESSAGE_COLUMNS).where(messages.c.session_pk == session.pk)
            if q.visible_only:
                stmt = stmt.where(messages.c.hidden.is_(False))
            if q.after_sequence:
                stmt = stmt.where(messages.c.sequence > q.after_sequence)
            if q.before_sequence:
                stmt = stmt.where(messages.c.sequence < q.before_sequence)
            order = messages.c.sequence.desc() if q.descending else messages.c.sequence.asc()
            stmt = stmt.order_by(order).limit(q.limit)
            return session, [_message_from_row(r, session_id) for r in await conn.execute(stmt)]

        return await self.db.read(op)

    async def delete_messages(
        self, session_id: str, *, message_id: str | None, after_sequence: int | None, now: datetime
    ) -> tuple[Session, list[str]]:
        async def op(conn: AsyncConnection) -> tuple[Session, list[str]]:
            before = await self._lock_session(conn, session_id)
            model.ensure_writable(before, now)
            cond = [messages.c.session_pk == before.pk]
            if message_id is not None:
                cond.append(messages.c.message_id == message_id)
            else:
                cond.append(messages.c.sequence > (after_sequence or 0))
            rows = (await conn.execute(select(messages.c.message_id, messages.c.sequence).where(*cond))).all()
            if message_id is not None and not rows:
                raise NotFound(
                    f"message {message_id!r} does not exist in session {session_id!r}",
                    reason="MESSAGE_NOT_FOUND",
                    metadata={"session_id": session_id, "message_id": message_id},
                )
            if not rows:
                return before, []
            await conn.execute(delete(messages).where(*cond))
            sequences = [r.sequence for r in rows]
            await conn.execute(
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
            await self._save_session(conn, before, after)
            return after, [r.message_id for r in rows]

        return await self.db.write(op)

    async def clear_session(self, session_id: str, now: datetime) -> Session:
        async def op(conn: AsyncConnection) -> Session:
            before = await self._lock_session(conn, session_id)
            after = model.clear(before, now)
            if after is not before:
                await conn.execute(delete(messages).where(messages.c.session_pk == before.pk))
                await conn.execute(delete(tool_calls).where(tool_calls.c.session_pk == before.pk))
            await self._save_session(conn, before, after)
            return after

        return await self.db.write(op)

    async def restore_session(
        self, session_id: str, history: Sequence[NewMessage], now: datetime
    ) -> tuple[Session, bool]:
        """Replaces the history of an expired session and starts a new life for it. An active session is
        returned unchanged (restored=False)."""

        async def op(conn: AsyncConnection) -> tuple[Session, bool]:
            before = await self._lock_session(conn, session_id)
            if before.status(now) is Status.ACTIVE:
                return before, False
            after = model.restore(before, len(history), now)
            await conn.execute(delete(messages).where(messages.c.session_pk == before.pk))
            await conn.execute(delete(tool_calls).where(tool_calls.c.session_pk == before.pk))
            if history:
                await self._insert_messages(conn, before, history, now)
            after = replace(after, last_sequence=before.last_sequence + len(history))
            await self._save_session(conn, before, after)
            return after, True

        return await self.db.write(op)

    async def count_sessions(self, now: datetime) -> dict[str, int]:
        async def op(conn: AsyncConnection) -> dict[str, int]:
            ended = sessions.c.end_time.is_not(None)
            live = sessions.c.end_time.is_(None)
            stmt = select(
                func.count().filter(live, sessions.c.expire_time > now).label("active"),
                func.count()
                .filter(live, sessions.c.expire_time > now, sessions.c.warn_time <= now)
                .label("expiring_soon"),
                func.count().filter(live, sessions.c.expire_time <= now).label("expired"),
                func.count().filter(ended).label("ended"),
            )
            row = (await conn.execute(stmt)).one()
            return dict(row._mapping)

        return await self.db.read(op)


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
