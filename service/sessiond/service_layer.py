"""The service layer: one async, keyword-only method per use case. It reads the clock, applies the domain
rules and calls the store; it knows nothing of gRPC."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Generic, TypeVar

from agentsessions.v1 import events_pb2

from .domain import model, paging, state
from .domain.agents import Agent, AgentOrigin, key_variable_denied, key_variable_refused
from .domain.clock import Clock
from .domain.errors import InvalidArgument, NotFound, etag_mismatch
from .domain.model import NewMessage, Session, Status, StoredMessage
from .domain.policy import POLICY_FIELDS, TimeoutLimits, TimeoutPolicy, resolve
from .domain.validation import AGENT_ID, Limits, check_page_size, check_variables, random_bits
from .events.bus import EventBus, InProcessEventBus
from .store.repository import (
    AppendEntry,
    AppendResult,
    MessagePageQuery,
    SessionFilter,
    Store,
    TurnLease,
)

UPDATABLE_SESSION_PATHS = frozenset(
    {"metadata", "variables", "timeout_policy", *(f"timeout_policy.{f}" for f in POLICY_FIELDS)}
)


T = TypeVar("T")

# Told of the turns a session change ended: (session id, turn ids, what ended them: "deleted", "cleared",
# "restored" or "ended"). The turn runner listens, to stop them.
TurnsEnded = Callable[[str, Sequence[str], str], None]


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str


@dataclass(frozen=True)
class SessionUpdate:
    """What UpdateSession asks for: the masked paths and the values they take (None: cleared)."""

    paths: frozenset[str]
    metadata: dict[str, str]
    variables: dict[str, Any]
    timeout_policy: TimeoutPolicy
    etag: str = ""


class SessionsService:
    def __init__(
        self,
        store: Store,
        *,
        clock: Clock,
        timeouts: TimeoutLimits,
        limits: Limits,
        bus: EventBus | None = None,
        allowed_key_vars: frozenset[str] = frozenset(),
    ) -> None:
        self.store = store
        self.clock = clock
        self.timeouts = timeouts
        self.limits = limits
        self.bus: EventBus = bus or InProcessEventBus()
        self.allowed_key_vars = allowed_key_vars  # for `api_key_env` of agents created through the API
        self._turns_ended: list[TurnsEnded] = []

    def on_turns_ended(self, listener: TurnsEnded) -> None:
        """Calls `listener` after a delete, a clear or a restore ended the lease of a running turn."""
        self._turns_ended.append(listener)

    def _ended(self, session_id: str, turn_ids: Sequence[str], cause: str) -> None:
        if turn_ids:
            for listener in self._turns_ended:
                listener(session_id, turn_ids, cause)

    # --- sessions ---------------------------------------------------------------------------------------

    async def create_session(
        self,
        *,
        session_id: str,
        agent_id: str,
        user_id: str,
        metadata: dict[str, str],
        variables: dict[str, Any],
        policy: TimeoutPolicy,
        request_id: str | None,
    ) -> tuple[Session, bool]:
        self.timeouts.validate(policy, "session.timeout_policy")
        now = self.clock.now()
        own, shared = state.split(variables, self.limits)  # `user:` / `app:` keys go to the shared scopes

        def build(agent: Agent) -> Session:
            return model.new_session(
                session_id=session_id,
                agent_id=agent.agent_id,
                user_id=user_id,
                metadata=metadata,
                variables=own,
                policy=policy,
                agent_policy=agent.timeout_defaults,
                effective=resolve(policy, agent.timeout_defaults, self.timeouts),
                request_id=request_id,
                now=now,
                incarnation=random_bits(62),
            )

        return await self.store.create_session(agent_id, build, shared=shared)

    async def get_session(self, *, session_id: str) -> Session:
        return await self.store.get_session(session_id)

    async def list_sessions(
        self,
        *,
        agent_id: str,
        user_id: str,
        status: Status | None,
        metadata: Mapping[str, str],
        page_size: int,
        page_token: str,
        now: datetime | None = None,
    ) -> Page[Session]:
        """A page of sessions; `status` is each one's at `now` (default: the clock's), which the caller
        shows them at too, so that a session expiring meanwhile is not listed as active and shown expired."""
        size = check_page_size(page_size, self.limits)
        fp = paging.fingerprint("sessions", agent_id, user_id, status, sorted(metadata.items()))
        before = paging.decode_token(page_token, fp)
        flt = SessionFilter(agent_id=agent_id, user_id=user_id, status=status, metadata=metadata)
        now = now or self.clock.now()
        rows = await self.store.list_sessions(flt, before_pk=before, limit=size + 1, now=now)
        items = rows[:size]
        token = paging.encode_token(items[-1].pk, fp) if len(rows) > size else ""
        return Page(items, token)

    async def update_session(self, *, session_id: str, update: SessionUpdate) -> Session:
        # `variables.<key>` paths patch one variable each, in the scope its prefix names (domain.state).
        variable_paths = {p for p in update.paths if p.startswith("variables.")}
        keys = frozenset(state.key_from_path(p) for p in variable_paths)
        if keys and "variables" in update.paths:
            raise InvalidArgument.field("update_mask", "names both variables and variables.<key> paths")
        unknown = sorted(update.paths - UPDATABLE_SESSION_PATHS - variable_paths)
        if unknown:
            raise InvalidArgument.field(
                "update_mask",
                f"cannot update {', '.join(unknown)}; allowed: {', '.join(sorted(UPDATABLE_SESSION_PATHS))}",
            )
        if not update.paths:
            raise InvalidArgument.field("update_mask", "names no field to update")
        policy_paths = {p for p in update.paths if p.startswith("timeout_policy")}
        now = self.clock.now()
        if "variables" in update.paths:
            own, shared = state.split(update.variables)
        else:
            _, shared = state.patch({}, keys, update.variables)

        def change(session: Session) -> Session:
            if update.etag and update.etag != session.etag:
                raise etag_mismatch("session", update.etag, session.etag)
            model.ensure_writable(session, now)
            changed = session
            if "metadata" in update.paths:
                changed = replace(changed, metadata=update.metadata)
            if "variables" in update.paths:
                changed = replace(changed, variables=own)
            elif keys:
                patched, _ = state.patch(session.variables, keys, update.variables)
                if patched != session.variables:
                    # Each call's keys are within the limit; what they add up to must be too.
                    check_variables(patched, self.limits, "session.variables")
                    changed = replace(changed, variables=patched)
            if policy_paths:
                fields = (
                    POLICY_FIELDS
                    if "timeout_policy" in policy_paths
                    else [p.split(".", 1)[1] for p in policy_paths]
                )
                tier = replace(session.policy, **{f: getattr(update.timeout_policy, f) for f in fields})
                self.timeouts.validate(tier, "session.timeout_policy")
                effective = resolve(tier, session.agent_policy, self.timeouts)
                changed = model.change_policy(changed, tier, effective, now, session.agent_policy)
            if changed is session:
                return session
            if changed.version == session.version:
                changed = replace(changed, update_time=now, version=session.version + 1)
            return changed

        def events(before: Session, after: Session) -> list[tuple[str, dict[str, Any]]]:
            out: list[tuple[str, dict[str, Any]]] = []
            if policy_paths and (after.effective != before.effective or after.policy != before.policy):
                out.append(("timeout_changed", {}))
            data_paths = sorted(update.paths & {"metadata", "variables"} | ({"variables"} if keys else set()))
            if data_paths:
                out.append(("updated", {"paths": data_paths}))
            return out

        return await self.store.change_session(
            session_id, change, events, now=now, shared=replace(shared, limits=self.limits)
        )

    async def end_session(self, *, session_id: str) -> Session:
        """Ends the session; a turn running in it is stopped (an ended session takes no more of its
        output, so the agent need not finish it)."""
        now = self.clock.now()
        running: list[str] = []
        session = await self.store.change_session(
            session_id,
            lambda s: model.end(s, now),
            lambda b, a: [("ended", {})],
            now=now,
            running_turns=running,
            on_commit=lambda: self._ended(session_id, running, "ended"),
        )
        return session

    async def delete_session(self, *, session_id: str, etag: str, force: bool, allow_missing: bool) -> None:
        ended: list[str] = []
        await self.store.delete_session(
            session_id,
            etag=etag,
            force=force,
            allow_missing=allow_missing,
            now=self.clock.now(),
            ended_turns=ended,
            on_commit=lambda: self._ended(session_id, ended, "deleted"),
        )

    async def renew_session(self, *, session_id: str) -> Session:
        now = self.clock.now()
        return await self.store.change_session(
            session_id, lambda s: model.renew(s, now), _renewed(manual=True), now=now
        )

    async def heartbeat(self, *, session_id: str) -> Session:
        now = self.clock.now()

        def beat(session: Session) -> Session:
            model.ensure_writable(session, now)
            return model.record_activity(session, now)

        return await self.store.change_session(session_id, beat, _renewed(manual=False), now=now)

    async def clear_session(self, *, session_id: str) -> Session:
        """Empties the history; the running turn is stopped and stores nothing more (design: Turns)."""
        ended: list[str] = []
        return await self.store.clear_session(
            session_id, self.clock.now(), ended, on_commit=lambda: self._ended(session_id, ended, "cleared")
        )

    async def restore_session(
        self, *, session_id: str, messages: Sequence[NewMessage]
    ) -> tuple[Session, bool]:
        """Replaces the history of an expired session; a turn still running from its old life is stopped
        and stores nothing more."""
        ended: list[str] = []
        return await self.store.restore_session(
            session_id,
            messages,
            self.clock.now(),
            ended,
            on_commit=lambda: self._ended(session_id, ended, "restored"),
        )

    # --- messages ---------------------------------------------------------------------------------------

    async def append_messages(
        self,
        *,
        session_id: str,
        messages: Sequence[NewMessage],
        live: list[Any] | None = None,
        set_variables: Mapping[str, Any] | None = None,
        lease: TurnLease | None = None,
    ) -> tuple[Session, list[StoredMessage]]:
        """Appends; `set_variables` are set key by key with the messages, in one transaction. With `lease`,
        the append is a turn's own (`TurnLease`)."""
        return await self.store.append_messages(
            session_id,
            messages,
            self.clock.now(),
            live,
            set_variables=set_variables or None,
            limits=self.limits,
            lease=lease,
        )

    async def append_each(self, entries: Sequence[AppendEntry]) -> list[AppendResult]:
        """Each entry as `append_messages` would append it, submitted together (BatchAppendMessages)."""
        return await self.store.append_each(entries, self.clock.now(), limits=self.limits)

    async def list_messages(
        self,
        *,
        session_id: str,
        visible_only: bool,
        descending: bool,
        after_sequence: int,
        before_sequence: int,
        page_size: int,
        page_token: str,
        with_session: bool = False,
    ) -> tuple[Page[StoredMessage], Session | None]:
        """A page of messages, and with `with_session` the session too, read at once."""
        size = check_page_size(page_size, self.limits)
        for name, value in (("after_sequence", after_sequence), ("before_sequence", before_sequence)):
            if value < 0:
                raise InvalidArgument.field(name, f"must not be negative, got {value}")
        fp = paging.fingerprint(
            "messages", session_id, visible_only, descending, after_sequence, before_sequence
        )
        position = paging.decode_token(page_token, fp)
        after, before = after_sequence, before_sequence
        if position and descending:
            before = min(before, position) if before else position
        elif position:
            after = max(after, position)
        query = MessagePageQuery(
            descending=descending,
            visible_only=visible_only,
            after_sequence=after,
            before_sequence=before,
            limit=size + 1,
        )
        session: Session | None = None
        if with_session:
            session, rows = await self.store.session_and_messages(session_id, query)
        else:
            rows = await self.store.list_messages(session_id, query)
        fit = paging.fitting(rows[:size], paging.MAX_PAGE_BYTES, paging.message_size)
        if fit == len(rows):
            return Page(rows, ""), session
        page, reach = paging.keep_tool_groups(rows[:fit], rows[fit], descending=descending)
        at_end = False
        # A group larger than the page: the page grows to hold it whole, and on while the messages it took
        # in belong to groups that reach further (calls in messages of their own, answered after all of
        # them), up to the largest page.
        while reach is not None:
            if descending:
                low, high = max(reach - 1, after), page[-1].sequence
                at_end = low == after
            else:
                low, high = page[-1].sequence, min(reach + 1, before) if before else reach + 1
                at_end = high == before
            rest = MessagePageQuery(
                descending=descending,
                visible_only=visible_only,
                after_sequence=low,
                before_sequence=high,
                limit=self.limits.max_page_size,
            )
            page = [*page, *await self.store.list_messages(session_id, rest)]
            edge = min(m.group_start for m in page) if descending else max(m.group_end for m in page)
            spills = edge <= low if descending else edge >= high
            reach = edge if spills and not at_end and len(page) < self.limits.max_page_size else None
        if at_end:  # the groups reached the end of what was asked for
            return Page(page, ""), session
        return Page(page, paging.encode_token(page[-1].sequence, fp)), session

    async def delete_messages(
        self,
        *,
        session_id: str,
        message_id: str | None,
        after_sequence: int | None,
        turn_id: str | None = None,
        lease: TurnLease | None = None,
    ) -> tuple[Session, list[str]]:
        """Deletes one message, or every message above `after_sequence` (with `turn_id`: only that turn's,
        as the rollback multitask strategy does, under the new turn's `lease`)."""
        if after_sequence is not None and after_sequence < 0:
            raise InvalidArgument.field("after_sequence", f"must not be negative, got {after_sequence}")
        return await self.store.delete_messages(
            session_id,
            message_id=message_id,
            after_sequence=after_sequence,
            now=self.clock.now(),
            turn_id=turn_id,
            lease=lease,
        )

    # --- agents -----------------------------------------------------------------------------------------

    def _check_key_variable(self, agent_id: str, backend: Mapping[str, Any]) -> None:
        refused = key_variable_refused(backend, self.allowed_key_vars)
        if refused is not None:
            raise key_variable_denied(agent_id, refused)

    async def create_agent(self, agent: Agent) -> Agent:
        self.timeouts.validate(agent.timeout_defaults, "agent.timeout_defaults")
        self._check_key_variable(agent.agent_id, agent.backend)
        now = self.clock.now()
        return await self.store.create_agent(
            replace(agent, origin=AgentOrigin.API, create_time=now, update_time=now, version=1)
        )

    async def get_agent(self, *, agent_id: str) -> Agent:
        return await self.store.get_agent(agent_id)

    def _agent_position(self, position: str) -> bool:
        return len(position) <= self.limits.max_agent_id_length and AGENT_ID.fullmatch(position) is not None

    async def list_agents(self, *, page_size: int, page_token: str) -> Page[Agent]:
        size = check_page_size(page_size, self.limits)
        fp = paging.fingerprint("agents")
        after = paging.decode_token(page_token, fp, str, valid=self._agent_position) if page_token else ""

        rows = await self.store.list_agents(after_id=after, limit=size + 1)
        items = rows[:size]
        fit = paging.fitting(items, paging.MAX_PAGE_BYTES, _agent_size)  # agents may be large
        more = len(rows) > size or fit < len(items)
        items = items[:fit]
        return Page(items, paging.encode_token(items[-1].agent_id, fp) if more else "")

    async def update_agent(self, *, agent_id: str, changes: dict[str, Any], etag: str) -> Agent:
        if not changes:
            raise InvalidArgument.field("update_mask", "names no field to update")
        if "timeout_defaults" in changes:
            self.timeouts.validate(changes["timeout_defaults"], "agent.timeout_defaults")
        if "backend" in changes:  # of any agent, a declared one too: the new settings come from the caller
            self._check_key_variable(agent_id, changes["backend"])
        now = self.clock.now()

        def change(agent: Agent) -> Agent:
            if etag and etag != agent.etag:
                raise etag_mismatch("agent", etag, agent.etag)
            return replace(agent, **changes, update_time=now, version=agent.version + 1)

        return await self.store.update_agent(agent_id, change)

    async def delete_agent(self, *, agent_id: str, allow_missing: bool) -> None:
        await self.store.delete_agent(agent_id, allow_missing=allow_missing)

    # --- stats ------------------------------------------------------------------------------------------

    async def session_counts(self) -> dict[str, int]:
        return await self.store.count_sessions(self.clock.now())

    # --- events -----------------------------------------------------------------------------------------

    async def publish_turn_event(
        self, event: events_pb2.TurnEvent, *, lease: TurnLease | None = None
    ) -> None:
        """Relays a turn event to the session's watchers. Turn started / finished are durable session events
        (stored, replayable); deltas and the rest are live only. With the turn's `lease`, the durable ones
        go to the session the turn started in only (not to one created again under its id)."""
        if event.WhichOneof("kind") in ("turn_started", "turn_finished"):
            # A session deleted under the turn leaves nobody to tell.
            with contextlib.suppress(NotFound):
                await self.store.record_event(
                    event.session_id, "turn", self.clock.now(), {"turn": event}, lease=lease
                )
            return
        self.bus.publish(events_pb2.SessionEvent(session_id=event.session_id, time=event.time, turn=event))


def _renewed(*, manual: bool) -> Callable[[Session, Session], list[tuple[str, dict[str, Any]]]]:
    """A renewed event when the expire time moved."""

    def events(before: Session, after: Session) -> list[tuple[str, dict[str, Any]]]:
        return [("renewed", {"manual": manual})] if after.expire_time != before.expire_time else []

    return events


def _agent_size(agent: Agent) -> int:
    """About what an agent takes on the wire (256: ids, times, policy)."""
    return len(json.dumps(agent.backend)) + len(agent.display_name) + 256
