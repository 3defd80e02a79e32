"""gRPC servicers: validate, convert, call the service layer, convert back. Nothing else lives here."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import grpc
from google.protobuf import empty_pb2

from agentsessions.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    agent_pb2,
    agent_service_pb2,
    agent_service_pb2_grpc,
    events_pb2,
    message_pb2,
    message_service_pb2,
    message_service_pb2_grpc,
    session_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
)

from .. import __version__
from ..domain.errors import DomainError, InvalidArgument
from ..domain.model import Session, Status, StoredMessage
from ..domain.validation import check_agent_id, check_message_id, check_session_id, check_text, uuid7
from ..service_layer import SessionsService, SessionUpdate
from ..store.repository import AppendEntry, AppendResult
from . import convert, events
from .errors import error_fields, streaming, unary, unexpected_error

log = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]

# Entries of a BatchAppendMessages call at most: fixed, not SESSIOND_MAX_BATCH_MESSAGES (which bounds the
# messages of each entry), so that lowering that limit does not fail the batches clients send (64 at most).
MAX_BATCH_REQUESTS = 100


def _only_wildcard(paths: Collection[str]) -> None:
    """`*` replaces every updatable field (AIP-134); other paths beside it would be ignored in silence."""
    if len(paths) > 1:
        raise InvalidArgument.field("update_mask", "'*' stands for every field and takes no other path")


class SessionServicer(session_service_pb2_grpc.SessionServiceServicer):
    def __init__(self, service: SessionsService, *, watch_buffer: int = 1024) -> None:
        self.svc = service
        self.watch_buffer = watch_buffer

    def _pb(self, session: Any) -> session_pb2.Session:
        return convert.session_to_pb(session, self.svc.clock.now())

    @unary
    async def CreateSession(
        self, request: session_service_pb2.CreateSessionRequest, context: Ctx
    ) -> session_pb2.Session:
        limits = self.svc.limits
        s = request.session
        session_id = request.session_id or uuid7()
        check_session_id(session_id, limits)
        check_agent_id(s.agent_id, limits, "session.agent_id")
        check_text(s.user_id, "session.user_id", limits.max_user_id_length)
        if request.request_id:
            check_text(request.request_id, "request_id", limits.max_request_id_length)
        session, _ = await self.svc.create_session(
            session_id=session_id,
            agent_id=s.agent_id,
            user_id=s.user_id,
            metadata=convert.metadata_from_pb(s.metadata, limits, "session.metadata"),
            variables=convert.variables_from_pb(s.variables, limits, "session.variables"),
            policy=convert.policy_from_pb(s.timeout_policy),
            request_id=request.request_id or None,
        )
        return self._pb(session)

    @unary
    async def GetSession(
        self, request: session_service_pb2.GetSessionRequest, context: Ctx
    ) -> session_pb2.Session:
        check_session_id(request.session_id, self.svc.limits)
        return self._pb(await self.svc.get_session(session_id=request.session_id))

    @unary
    async def ListSessions(
        self, request: session_service_pb2.ListSessionsRequest, context: Ctx
    ) -> session_service_pb2.ListSessionsResponse:
        limits = self.svc.limits
        if request.status and request.status not in Status._value2member_map_:
            raise InvalidArgument.field("status", f"unknown session status {request.status}")
        # Filters follow the rules of the values they match: a malformed one is an error, not "no match".
        if request.agent_id:
            check_agent_id(request.agent_id, limits)
        check_text(request.user_id, "user_id", limits.max_user_id_length)
        now = self.svc.clock.now()  # one instant for the filter and the statuses shown
        page = await self.svc.list_sessions(
            agent_id=request.agent_id,
            user_id=request.user_id,
            status=Status(request.status) if request.status else None,
            metadata=convert.metadata_from_pb(request.metadata, limits, "metadata"),
            page_size=request.page_size,
            page_token=request.page_token,
            now=now,
        )
        return session_service_pb2.ListSessionsResponse(
            sessions=[convert.session_to_pb(s, now) for s in page.items], next_page_token=page.next_page_token
        )

    @unary
    async def UpdateSession(
        self, request: session_service_pb2.UpdateSessionRequest, context: Ctx
    ) -> session_pb2.Session:
        limits = self.svc.limits
        s = request.session
        check_session_id(s.session_id, limits, "session.session_id")
        if request.HasField("update_mask"):
            paths = frozenset(request.update_mask.paths)
            if "*" in paths:
                _only_wildcard(paths)
                paths = frozenset({"metadata", "variables", "timeout_policy"})
        else:  # AIP-134: no mask means every field the request populates
            paths = frozenset(
                p
                for p, present in (
                    ("metadata", bool(s.metadata)),
                    ("variables", s.HasField("variables")),
                    ("timeout_policy", s.HasField("timeout_policy")),
                )
                if present
            )
        session = await self.svc.update_session(
            session_id=s.session_id,
            update=SessionUpdate(
                paths=paths,
                metadata=convert.metadata_from_pb(s.metadata, limits, "session.metadata"),
                variables=convert.variables_from_pb(s.variables, limits, "session.variables"),
                timeout_policy=convert.policy_from_pb(s.timeout_policy),
                etag=s.etag,
            ),
        )
        return self._pb(session)

    @unary
    async def EndSession(
        self, request: session_service_pb2.EndSessionRequest, context: Ctx
    ) -> session_pb2.Session:
        check_session_id(request.session_id, self.svc.limits)
        return self._pb(await self.svc.end_session(session_id=request.session_id))

    @unary
    async def DeleteSession(
        self, request: session_service_pb2.DeleteSessionRequest, context: Ctx
    ) -> empty_pb2.Empty:
        check_session_id(request.session_id, self.svc.limits)
        await self.svc.delete_session(
            session_id=request.session_id,
            etag=request.etag,
            force=request.force,
            allow_missing=request.allow_missing,
        )
        return empty_pb2.Empty()

    @unary
    async def RenewSession(
        self, request: session_service_pb2.RenewSessionRequest, context: Ctx
    ) -> session_pb2.Session:
        check_session_id(request.session_id, self.svc.limits)
        return self._pb(await self.svc.renew_session(session_id=request.session_id))

    @unary
    async def Heartbeat(
        self, request: session_service_pb2.HeartbeatRequest, context: Ctx
    ) -> session_pb2.Session:
        check_session_id(request.session_id, self.svc.limits)
        return self._pb(await self.svc.heartbeat(session_id=request.session_id))

    @unary
    async def ClearSession(
        self, request: session_service_pb2.ClearSessionRequest, context: Ctx
    ) -> session_pb2.Session:
        check_session_id(request.session_id, self.svc.limits)
        return self._pb(await self.svc.clear_session(session_id=request.session_id))

    @unary
    async def RestoreSession(
        self, request: session_service_pb2.RestoreSessionRequest, context: Ctx
    ) -> session_service_pb2.RestoreSessionResponse:
        check_session_id(request.session_id, self.svc.limits)
        history = convert.new_messages_from_pb(request.messages, self.svc.limits, allow_empty=True)
        session, restored = await self.svc.restore_session(session_id=request.session_id, messages=history)
        return session_service_pb2.RestoreSessionResponse(session=self._pb(session), restored=restored)

    @streaming
    async def WatchSession(
        self, request: session_service_pb2.WatchSessionRequest, context: Ctx
    ) -> AsyncIterator[events_pb2.SessionEvent]:
        check_session_id(request.session_id, self.svc.limits)
        after = request.after_event_id if request.HasField("after_event_id") else None
        if after is not None and after < 0:
            raise InvalidArgument.field("after_event_id", f"must not be negative, got {after}")
        stream = events.watch(
            self.svc,
            request.session_id,
            after,
            include_deltas=request.include_deltas,
            buffer=self.watch_buffer,
        )
        async for event in stream:
            yield event


# What each entry of a batch ended with, by gRPC status code name (OK included).
EntryCounter = Callable[[list[str]], None]
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class MessageServicer(message_service_pb2_grpc.MessageServiceServicer):
    def __init__(self, service: SessionsService, *, count_entries: EntryCounter | None = None) -> None:
        """`count_entries` is told the code each entry of a BatchAppendMessages call ended with (the
        metrics: the call itself counts as one call, whatever its entries' outcomes)."""
        self.svc = service
        self._count_entries = count_entries

    @unary
    async def AppendMessages(
        self, request: message_service_pb2.AppendMessagesRequest, context: Ctx
    ) -> message_service_pb2.AppendMessagesResponse:
        return await self._append(request)

    @unary
    async def BatchAppendMessages(
        self, request: message_service_pb2.BatchAppendMessagesRequest, context: Ctx
    ) -> message_service_pb2.BatchAppendMessagesResponse:
        if not request.requests:
            raise InvalidArgument.field("requests", "at least one request is required")
        if len(request.requests) > MAX_BATCH_REQUESTS:
            raise InvalidArgument.field(
                "requests",
                f"at most {MAX_BATCH_REQUESTS} requests per call, got {len(request.requests)}",
                limit=str(MAX_BATCH_REQUESTS),
            )
        # All at once, as separate calls made together would be: their writes join the same group commit.
        # Each entry's outcome: what it stored (with its events), or its error.
        results: list[AppendResult | BaseException | None] = [None] * len(request.requests)
        entries: list[AppendEntry] = []
        slots: list[int] = []  # the index of the request each of `entries` came from
        for i, entry in enumerate(request.requests):
            try:
                entries.append(self._entry(entry))
                slots.append(i)
            except Exception as exc:
                results[i] = exc
        for i, done in zip(slots, await self.svc.append_each(entries) if entries else (), strict=True):
            if done.error is not None and not isinstance(done.error, Exception):
                raise done.error  # cancelled, or the process told to stop: not an entry's outcome
            results[i] = done if done.error is None else done.error
        # Built in place: each answer constructed on its own and copied into its outcome, and the outcomes
        # into the response, cost twice as much.
        response = message_service_pb2.BatchAppendMessagesResponse()
        codes: list[str] = []
        # Entries that failed unexpectedly (the database gone, say) usually failed alike: each is answered
        # with its error, but the log gets one traceback per kind of failure and a count, not one each.
        failed: dict[str, int] = {}  # unexpected failures by exception type
        for result in results:
            outcome = response.outcomes.add()
            if isinstance(result, AppendResult):
                assert result.result is not None
                try:
                    self._answer(outcome.response, *result.result, result.live)
                    codes.append("OK")
                    continue
                except Exception as exc:  # a bug in converting this entry's answer: its own error
                    outcome.ClearField("response")
                    result = exc
            assert isinstance(result, Exception), "every entry has its outcome"
            if isinstance(result, DomainError):
                error = result
            else:
                kind = type(result).__qualname__
                error = unexpected_error(
                    result, "MessageServicer.BatchAppendMessages", logged=kind not in failed
                )
                failed[kind] = failed.get(kind, 0) + 1
            outcome.error.MergeFrom(message_service_pb2.AppendError(**error_fields(error)))
            codes.append(_CODE_NAMES.get(outcome.error.code, "UNKNOWN"))
        for kind, count in failed.items():
            if count > 1:
                log.warning("%d entries of a BatchAppendMessages call failed with %s", count, kind)
        if self._count_entries is not None:
            self._count_entries(codes)
        return response

    def _entry(self, request: message_service_pb2.AppendMessagesRequest) -> AppendEntry:
        """An append's request, validated."""
        check_session_id(request.session_id, self.svc.limits)
        return AppendEntry(
            request.session_id,
            convert.new_messages_from_pb(request.messages, self.svc.limits),
            convert.variables_from_pb(request.set_variables, self.svc.limits, "set_variables")
            if request.HasField("set_variables")
            else None,
        )

    async def _append(
        self, request: message_service_pb2.AppendMessagesRequest
    ) -> message_service_pb2.AppendMessagesResponse:
        entry = self._entry(request)
        live: list[events_pb2.SessionEvent] = []
        session, stored = await self.svc.append_messages(
            session_id=entry.session_id, messages=entry.messages, live=live, set_variables=entry.set_variables
        )
        return self._answer(message_service_pb2.AppendMessagesResponse(), session, stored, live)

    def _answer(
        self,
        out: message_service_pb2.AppendMessagesResponse,
        session: Session,
        stored: list[StoredMessage],
        live: list[events_pb2.SessionEvent],
    ) -> message_service_pb2.AppendMessagesResponse:
        """Fills `out`, an append's answer: the messages as stored, and the session."""
        if len(live) == 1 and len(live[0].messages_appended.messages) == len(stored):
            # Nothing was there already: the event published holds this answer, converted once.
            out.messages.extend(live[0].messages_appended.messages)
            out.session.CopyFrom(live[0].session)
        else:
            out.messages.extend(convert.message_to_pb(m, ui_view=False) for m in stored)
            out.session.CopyFrom(convert.session_to_pb(session, self.svc.clock.now()))
        return out

    @unary
    async def ListMessages(
        self, request: message_service_pb2.ListMessagesRequest, context: Ctx
    ) -> message_service_pb2.ListMessagesResponse:
        check_session_id(request.session_id, self.svc.limits)
        if request.view not in message_pb2.MessageView.values():
            raise InvalidArgument.field("view", f"unknown view {request.view}")
        if request.order not in message_pb2.MessageOrder.values():
            raise InvalidArgument.field("order", f"unknown order {request.order}")
        ui = request.view == message_pb2.MESSAGE_VIEW_UI
        page, session = await self.svc.list_messages(
            session_id=request.session_id,
            visible_only=ui,
            descending=request.order == message_pb2.MESSAGE_ORDER_DESCENDING,
            after_sequence=request.after_sequence,
            before_sequence=request.before_sequence,
            page_size=request.page_size,
            page_token=request.page_token,
            with_session=request.include_session,
        )
        return message_service_pb2.ListMessagesResponse(
            messages=[convert.message_to_pb(m, ui_view=ui) for m in page.items],
            next_page_token=page.next_page_token,
            session=None if session is None else convert.session_to_pb(session, self.svc.clock.now()),
        )

    @unary
    async def DeleteMessages(
        self, request: message_service_pb2.DeleteMessagesRequest, context: Ctx
    ) -> message_service_pb2.DeleteMessagesResponse:
        check_session_id(request.session_id, self.svc.limits)
        target = request.WhichOneof("target")
        if target is None:
            raise InvalidArgument.field("target", "set message_id or after_sequence")
        if target == "message_id":
            check_message_id(request.message_id, self.svc.limits, "message_id")
        session, _deleted = await self.svc.delete_messages(
            session_id=request.session_id,
            message_id=request.message_id if target == "message_id" else None,
            after_sequence=request.after_sequence if target == "after_sequence" else None,
        )
        return message_service_pb2.DeleteMessagesResponse(
            deleted_count=len(_deleted), session=convert.session_to_pb(session, self.svc.clock.now())
        )


class AgentRegistryServicer(agent_service_pb2_grpc.AgentRegistryServiceServicer):
    def __init__(self, service: SessionsService) -> None:
        self.svc = service

    @unary
    async def CreateAgent(
        self, request: agent_service_pb2.CreateAgentRequest, context: Ctx
    ) -> agent_pb2.Agent:
        agent_id = request.agent_id or request.agent.agent_id
        check_agent_id(agent_id, self.svc.limits)
        agent = convert.agent_from_pb(request.agent, agent_id, self.svc.clock.now())
        return convert.agent_to_pb(await self.svc.create_agent(agent))

    @unary
    async def GetAgent(self, request: agent_service_pb2.GetAgentRequest, context: Ctx) -> agent_pb2.Agent:
        check_agent_id(request.agent_id, self.svc.limits)
        return convert.agent_to_pb(await self.svc.get_agent(agent_id=request.agent_id))

    @unary
    async def ListAgents(
        self, request: agent_service_pb2.ListAgentsRequest, context: Ctx
    ) -> agent_service_pb2.ListAgentsResponse:
        page = await self.svc.list_agents(page_size=request.page_size, page_token=request.page_token)
        return agent_service_pb2.ListAgentsResponse(
            agents=[convert.agent_to_pb(a) for a in page.items], next_page_token=page.next_page_token
        )

    @unary
    async def UpdateAgent(
        self, request: agent_service_pb2.UpdateAgentRequest, context: Ctx
    ) -> agent_pb2.Agent:
        pb = request.agent
        check_agent_id(pb.agent_id, self.svc.limits, "agent.agent_id")
        paths = set(request.update_mask.paths)
        if "*" in paths:
            _only_wildcard(paths)
            paths = {"display_name", "backend", "timeout_defaults", "history_window"}
        changes: dict[str, Any] = {}
        for path in paths:
            if path == "display_name":
                check_text(pb.display_name, "agent.display_name", 256)
                changes[path] = pb.display_name
            elif path == "backend":
                changes[path] = convert.backend_from_pb(pb)
            elif path == "timeout_defaults":
                changes[path] = convert.policy_from_pb(pb.timeout_defaults)
            elif path == "history_window":
                convert.check_history_window(pb.history_window)
                changes[path] = pb.history_window
            else:
                raise InvalidArgument.field(
                    "update_mask",
                    f"cannot update {path!r}; allowed: display_name, backend, timeout_defaults, "
                    "history_window",
                )
        updated = await self.svc.update_agent(agent_id=pb.agent_id, changes=changes, etag=pb.etag)
        return convert.agent_to_pb(updated)

    @unary
    async def DeleteAgent(
        self, request: agent_service_pb2.DeleteAgentRequest, context: Ctx
    ) -> empty_pb2.Empty:
        check_agent_id(request.agent_id, self.svc.limits)
        await self.svc.delete_agent(agent_id=request.agent_id, allow_missing=request.allow_missing)
        return empty_pb2.Empty()


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(
        self, service: SessionsService, *, database: str, running_turns: Callable[[], int] = lambda: 0
    ) -> None:
        self.svc = service
        self.database = database
        self.running_turns = running_turns
        self.started_wall = service.clock.now()
        self.started = time.monotonic()

    @unary
    async def GetServerStats(
        self, request: admin_service_pb2.GetServerStatsRequest, context: Ctx
    ) -> admin_service_pb2.ServerStats:
        counts = await self.svc.session_counts()
        stats = admin_service_pb2.ServerStats(
            active_sessions=counts["active"],
            expiring_soon_sessions=counts["expiring_soon"],
            expired_sessions=counts["expired"],
            ended_sessions=counts["ended"],
            running_turns=self.running_turns(),
            version=__version__,
            database=self.database,
        )
        stats.uptime.FromSeconds(int(time.monotonic() - self.started))
        stats.start_time.FromDatetime(self.started_wall)
        return stats
