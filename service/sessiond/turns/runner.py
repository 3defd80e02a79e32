"""The turn runner: one turn per session at a time, multitask strategies, stop, continue, replays.

A turn runs in a task of its own, apart from the RPC that started it, so it can outlive its caller
(`DisconnectBehavior.CONTINUE`) and be followed by several callers (a retry with the same request id
joins it). Its life:

1. Acquire the session's turn lease in the database (`TurnStore.acquire`), which first checks that the
   request can start at all. If another turn holds it, the request's strategy decides: reject (ABORTED /
   TURN_IN_PROGRESS), interrupt or rollback (stop that turn, wait for it to end, take the lease), or
   enqueue (wait for it to end, take the lease). Taking the lease and starting the turn are one step the
   caller's cancel cannot split (`TurnRunner._begin`).
2. Store the input (the user message, or the client tool results of a continue) through the message
   store, then emit TurnStarted. Rollback deletes the stopped turn's messages first.
3. Call the agent's backend with the history window and relay its stream: each event is kept for the
   turn's followers and published to the session's watchers.
4. Store the assistant message (COMPLETE; INTERRUPTED with the partial output when stopped; ERROR when
   the agent failed), emit MessageCompleted, release the lease, and emit TurnFinished last.

Stopping a turn cancels only the task that iterates the agent's stream; the turn itself goes on to store
what was produced and finish. A stop reaches a turn owned by another process through its lease row. The
turn's writes hold to its lease (`TurnLease`): once a delete, a clear or a restore ended it, the turn is
stopped and stores nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from google.protobuf import timestamp_pb2
from opentelemetry.trace import INVALID_SPAN, Span, Status, StatusCode, Tracer

from agentsessions.v1 import agent_service_pb2, events_pb2, message_pb2

from ..api.convert import check_call_id, message_to_pb, session_to_pb
from ..domain.agents import Agent
from ..domain.clock import Clock, SystemClock
from ..domain.errors import DomainError, InvalidArgument, message_exists, shutting_down
from ..domain.model import MessageStatus, NewMessage, Role, Session, StoredMessage
from ..domain.turns import (
    DisconnectBehavior,
    FinishReason,
    MultitaskStrategy,
    StopMode,
    TurnKind,
    TurnRecord,
    TurnRequest,
    TurnState,
    history_window,
    turn_in_progress,
)
from ..domain.validation import uuid7
from ..events.bus import Subscription
from ..service_layer import SessionsService
from ..store.repository import TurnLease, session_gone
from ..store.turns import Acquired, Acquisition, Busy, Existing, TurnStore
from ..tracing import NO_TRACER
from .backends import AgentBackend, AgentFailure, Backends

log = logging.getLogger(__name__)

TurnEvent = events_pb2.TurnEvent
_DELTAS = ("text_delta", "reasoning_delta")


class TurnStream(Protocol):
    """What Execute streams: a turn running here, or the stored events of one that ran."""

    turn_id: str

    @property
    def finished(self) -> bool: ...

    def events(self) -> AsyncIterator[TurnEvent]: ...

    def stop(self, mode: StopMode) -> bool: ...


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def stamp(ts: timestamp_pb2.Timestamp, when: datetime) -> None:
    """`ts.FromDatetime(when)` at a quarter of its cost (timedelta arithmetic instead of timetuples)."""
    since = when - _EPOCH
    ts.seconds = since.days * 86_400 + since.seconds
    ts.nanos = since.microseconds * 1000


# --- the event log kept for replays --------------------------------------------------------------------


def compact(events: Sequence[TurnEvent]) -> list[TurnEvent]:
    """The events with each run of text (or reasoning) deltas merged into one delta: what a replay sends."""
    out: list[TurnEvent] = []
    chunks: list[str] = []

    def close_run() -> None:
        if len(chunks) > 1:
            last = out[-1]
            getattr(last, last.WhichOneof("kind")).text = "".join(chunks)
        chunks.clear()

    for event in events:
        kind = event.WhichOneof("kind")
        if kind in _DELTAS and chunks and out[-1].WhichOneof("kind") == kind:
            chunks.append(getattr(event, kind).text)
            continue
        close_run()
        if kind in _DELTAS:
            merged = TurnEvent()
            merged.CopyFrom(event)
            out.append(merged)
            chunks.append(getattr(event, kind).text)
        else:
            out.append(event)
    close_run()
    return out


def encode_log(events: Sequence[TurnEvent]) -> bytes:
    """Length-prefixed serialized events."""
    out = bytearray()
    for event in events:
        data = event.SerializeToString()
        out += len(data).to_bytes(4, "big") + data
    return bytes(out)


def decode_log(data: bytes) -> list[TurnEvent]:
    events, at = [], 0
    while at < len(data):
        size = int.from_bytes(data[at : at + 4], "big")
        events.append(TurnEvent.FromString(data[at + 4 : at + 4 + size]))
        at += 4 + size
    return events


# --- a turn running in this process ----------------------------------------------------------------------


class Turn:
    """A turn running here: its events so far (followers replay them, then follow live), and its stop."""

    def __init__(
        self,
        runner: TurnRunner,
        record: TurnRecord,
        request: TurnRequest,
        agent: Agent,
        session: Session,
        rolled_back: Sequence[TurnRecord],
    ) -> None:
        self.runner = runner
        self.record = record
        self.turn_id = record.turn_id
        self.session_id = record.session_id
        self.request = request
        self.agent = agent
        self.session = session
        self.rolled_back = list(rolled_back)
        # The turn's own writes hold to its lease and to the session row it started in.
        self.lease = TurnLease(record.session_pk, record.turn_id, runner.owner)
        self.message_id = uuid7()  # the id the assistant message will be stored under
        self.registered_at = time.monotonic()
        self.active_at = runner.clock.now()  # the last activity it recorded on its session
        self.emitted: list[TurnEvent] = []
        self.stop_mode = StopMode.NONE
        # Why the turn's lease was ended under it (its session deleted, cleared or restored): it then
        # stores nothing more and ends with this error.
        self.ended: events_pb2.TurnError | None = None
        # Why the server stopped the turn (it is shutting down): it keeps its partial output, as a stop
        # does, and ends with this error, which its caller may retry elsewhere.
        self.interrupted: events_pb2.TurnError | None = None
        self.concluding = False
        self.started = asyncio.Event()
        self.start_error: BaseException | None = None
        self.done = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._finished = False
        self._wakeups: list[asyncio.Future[None]] = []
        # Events wait here for publication to the session's watchers, in order, by one task at a time:
        # the followers of the turn never wait for a durable event to be written.
        self._outbox: deque[TurnEvent] = deque()
        self._silent = False  # see `end`
        self._publisher: asyncio.Task[None] | None = None
        self._agent_task: asyncio.Task[None] | None = None
        self._agent_reason: int | None = None
        # The assistant message, built as the agent streams: finished parts, and the run of text (or
        # reasoning) deltas still open.
        self._parts: list[message_pb2.Part] = []
        self._open_kind = ""
        self._open: list[str] = []
        self._pending_calls: dict[str, str] = {}
        self._call_ids: set[str] = set()
        # An upper bound of the stored message's size, kept under the limit a caller's message has.
        self._answer_bytes = 0
        self.span: Span = INVALID_SPAN  # the turn's span, once it runs

    @property
    def finished(self) -> bool:
        return self._finished

    # --- followers ---

    async def events(self) -> AsyncIterator[TurnEvent]:
        """Every event of the turn from the first, then live ones until TurnFinished."""
        loop = asyncio.get_running_loop()
        i = 0
        while True:
            while i < len(self.emitted):
                yield self.emitted[i]
                i += 1
            if self._finished:
                if i >= len(self.emitted):
                    return
                continue
            wakeup: asyncio.Future[None] = loop.create_future()
            self._wakeups.append(wakeup)
            try:
                await wakeup
            finally:
                if not wakeup.done():
                    self._wakeups.remove(wakeup)

    def _deliver(self, event: TurnEvent, *, last: bool = False) -> None:
        self.emitted.append(event)
        if last:
            self._finished = True
        self._wake()

    def _wake(self) -> None:
        wakeups, self._wakeups = self._wakeups, []
        for wakeup in wakeups:
            if not wakeup.done():
                wakeup.set_result(None)

    def _end_followers(self) -> None:
        """Ends the followers' streams of a turn that did not get to TurnFinished."""
        self._finished = True
        self._wake()

    def _event(self) -> TurnEvent:
        # Built field by field: on the delta path this is a measurable share of the relay's cost.
        event = TurnEvent()
        event.session_id = self.session_id
        event.turn_id = self.turn_id
        event.index = len(self.emitted) + 1
        stamp(event.time, self.runner.clock.now())
        return event

    def _emit(self, event: TurnEvent) -> None:
        self._deliver(event)
        self._publish_later(event)

    def _publish_later(self, event: TurnEvent) -> None:
        if self._silent:
            return
        self._outbox.append(event)
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.create_task(self._publish_all())

    async def _publish_all(self) -> None:
        publish = self.runner._publish
        outbox = self._outbox
        while outbox:
            await publish(outbox.popleft(), self.lease)

    async def _published(self) -> None:
        """Returns once every event emitted so far was published."""
        while self._publisher is not None and not self._publisher.done():
            await asyncio.wait([self._publisher])

    # --- stop ---

    def stop(self, mode: StopMode) -> bool:
        """Asks the turn to stop; False when it is already past the point where a stop changes anything."""
        if self._finished or self.concluding:
            return False
        self.stop_mode = max(self.stop_mode, mode)
        if self._agent_task is not None and not self._agent_task.done():
            self._agent_task.cancel()
        return True

    def end(self, error: events_pb2.TurnError, *, session_gone: bool = False) -> None:
        """The turn's lease was ended under it (its session deleted, cleared or restored): it stops, stores
        nothing more (its writes would be refused anyway) and ends with `error`. A deleted session's turn
        also stops publishing: its watchers are gone, and a session created again under the id is not
        the turn's (its followers still get every event)."""
        if self._finished:
            return
        if self.ended is None:
            self.ended = error
        if session_gone:
            self._silent = True
            self._outbox.clear()
        self.runner._detach(self)
        self.stop(StopMode.CANCEL)

    def ended_by(self, cause: str) -> None:
        """`end` for a session change: "deleted", "cleared", "restored" or "ended"."""
        self.end(_ended_error(self.session_id, cause), session_gone=cause == "deleted")

    def shut_down(self) -> None:
        """The server is shutting down: the turn stops as for StopTurn (its partial output is stored,
        INTERRUPTED) and ends with a retryable `SERVER_SHUTTING_DOWN` error instead of CANCELLED."""
        if self.stop(StopMode.CANCEL) and self.interrupted is None:
            self.interrupted = events_pb2.TurnError(
                reason="SERVER_SHUTTING_DOWN",
                message="the server is shutting down; the turn was stopped",
                retryable=True,
            )

    # --- the turn's life ---

    async def run(self) -> None:
        # The turn's span: a child of the RPC that started it (this task copied that call's context), and
        # the parent of the agent's call.
        attributes = {
            "sessiond.session_id": self.session_id,
            "sessiond.turn_id": self.turn_id,
            "sessiond.agent_id": self.agent.agent_id,
            "sessiond.agent_backend": str(self.agent.backend.get("kind", "")),
        }
        with self.runner.tracer.start_as_current_span("turn", attributes=attributes) as span:
            self.span = span
            await self._run()

    async def _run(self) -> None:
        try:
            try:
                stored = await self._prepare()
            except Exception as exc:
                await self._abandon(exc)
                return
            self.started.set()
            reason, error = await self._drive(stored)
            if self.ended is not None:
                reason, error = FinishReason.ERROR, self.ended
            elif self.interrupted is not None and reason is FinishReason.CANCELLED:
                reason, error = FinishReason.ERROR, self.interrupted
            await self._conclude(reason, error)
        except asyncio.CancelledError:
            if self._agent_task is not None:
                self._agent_task.cancel()
            raise
        except Exception:
            log.exception("turn %s of session %s failed", self.turn_id, self.session_id)
            if not self.concluding:
                with contextlib.suppress(Exception):
                    await self._conclude(FinishReason.ERROR, _internal_error())
        finally:
            self.runner._forget(self)
            if not self.started.is_set():
                self.start_error = self.start_error or DomainError("the turn could not start")
                self.started.set()
            if not self._finished:
                self._end_followers()
            self.done.set()

    async def _abandon(self, exc: Exception) -> None:
        """The input could not be stored: the turn never started; the caller gets the error."""
        self.concluding = True
        if not isinstance(exc, DomainError):
            log.error("turn %s could not start", self.turn_id, exc_info=exc)
        try:
            await self.runner.turns.abandon(self.record)
        except Exception:
            log.warning("could not release the lease of turn %s; it runs out by itself", self.turn_id)
        self.runner._forget(self)
        self.start_error = exc
        self.started.set()
        self._end_followers()

    async def _prepare(self) -> StoredMessage | None:
        svc = self.runner.service
        for old in self.rolled_back:
            await svc.delete_messages(
                session_id=self.session_id,
                message_id=None,
                after_sequence=old.start_sequence,
                turn_id=old.turn_id,
                lease=self.lease,
            )
        stored = None
        new = self.request.message or self.request.tool_results
        if new is not None:
            self.session, messages = await svc.append_messages(
                session_id=self.session_id, messages=[replace(new, turn_id=self.turn_id)], lease=self.lease
            )
            stored = messages[0]
            if stored.turn_id != self.turn_id:
                # A message already held that id (appends are idempotent on ids, so it came back as it
                # was): this turn would answer it again, whoever wrote it. The turn never starts.
                raise message_exists(self.session_id, stored.message_id)
        event = self._event()
        started = event.turn_started
        started.SetInParent()
        if stored is not None:
            started.user_message.CopyFrom(message_to_pb(stored, ui_view=False))
        started.continued_turn_id = self.request.continue_turn_id
        started.trigger_name = self.request.trigger_name
        self._emit(event)
        return stored

    async def _agent_request(
        self, backend: AgentBackend, stored: StoredMessage | None
    ) -> agent_service_pb2.RespondRequest:
        svc = self.runner.service
        if backend.uses_history:
            page, session = await svc.list_messages(
                session_id=self.session_id,
                visible_only=False,
                descending=True,
                after_sequence=0,
                before_sequence=0,
                page_size=history_window(self.agent.history_window),
                page_token="",
                with_session=True,
            )
            if session is None or session.pk != self.record.session_pk:
                # Deleted and created again under its id: that history belongs to another session.
                raise session_gone(self.session_id, self.turn_id)
            history = [message_to_pb(m, ui_view=False) for m in reversed(page.items)]
        else:  # the echo agent answers the input alone
            history = [message_to_pb(stored, ui_view=False)] if stored is not None else []
        request = agent_service_pb2.RespondRequest(
            session=session_to_pb(self.session, svc.clock.now()), turn_id=self.turn_id, history=history
        )
        if self.request.kind is TurnKind.MESSAGE and stored is not None:
            request.message.CopyFrom(message_to_pb(stored, ui_view=False))
        elif self.request.kind is TurnKind.TRIGGER:
            request.trigger.CopyFrom(self.request.trigger)
        elif self.request.kind is TurnKind.CONTINUE:
            request.continue_turn.CopyFrom(self.request.continue_turn)
        return request

    async def _drive(self, stored: StoredMessage | None) -> tuple[FinishReason, events_pb2.TurnError | None]:
        if self.stop_mode:
            return FinishReason.CANCELLED, None
        try:
            backend = self.runner.backends.for_agent(self.agent)
            request = await self._agent_request(backend, stored)
        except DomainError as exc:
            return FinishReason.ERROR, events_pb2.TurnError(reason=exc.reason, message=exc.message)
        except Exception:
            log.exception("turn %s: preparing the agent's request failed", self.turn_id)
            return FinishReason.ERROR, _internal_error()
        if self.stop_mode:
            return FinishReason.CANCELLED, None
        self._agent_task = asyncio.create_task(self._consume(backend, request), name=f"agent-{self.turn_id}")
        await asyncio.wait([self._agent_task])
        if self._agent_task.cancelled():
            return FinishReason.CANCELLED, None
        # Retrieved before a stop is looked at: a stop that landed just after the agent failed still
        # cancels the turn, and the failure must not reach asyncio's "never retrieved" log.
        failure = self._agent_task.exception()
        if self.stop_mode:
            return FinishReason.CANCELLED, None
        if failure is None:
            return self._finish_reason()
        if isinstance(failure, _AnswerFull):
            return FinishReason.LENGTH, None
        if isinstance(failure, AgentFailure):
            error = events_pb2.TurnError(
                reason=failure.reason, message=failure.message, retryable=failure.retryable
            )
            return FinishReason.ERROR, error
        log.error("turn %s: the agent backend failed", self.turn_id, exc_info=failure)
        return FinishReason.ERROR, _internal_error()

    def _finish_reason(self) -> tuple[FinishReason, events_pb2.TurnError | None]:
        if self._pending_calls:
            return FinishReason.CLIENT_TOOL_CALLS, None
        reason = self._agent_reason
        if reason == events_pb2.FINISH_REASON_LENGTH:
            return FinishReason.LENGTH, None
        if reason == events_pb2.FINISH_REASON_CANCELLED:
            return FinishReason.CANCELLED, None
        if reason == events_pb2.FINISH_REASON_ERROR:
            error = events_pb2.TurnError(reason="AGENT_ERROR", message="the agent reported a failure")
            return FinishReason.ERROR, error
        return FinishReason.STOP, None

    async def _consume(self, backend: AgentBackend, request: agent_service_pb2.RespondRequest) -> None:
        async with contextlib.aclosing(backend.respond(request)) as stream:
            async for response in stream:
                kind = response.WhichOneof("kind")
                if kind == "text_delta":
                    self._delta("text_delta", response.text_delta.text)
                elif kind == "reasoning_delta":
                    self._delta("reasoning_delta", response.reasoning_delta.text)
                elif kind == "tool_call":
                    self._tool_call(response.tool_call)
                elif kind == "client_tool_request":
                    self._client_tool_request(response.client_tool_request)
                elif kind == "usage":
                    event = self._event()
                    event.usage.CopyFrom(response.usage)
                    self._emit(event)
                elif kind == "finished":
                    self._agent_reason = response.finished.reason
                    return
                elif kind == "error":
                    raise AgentFailure(
                        response.error.message or "the agent reported an error",
                        retryable=response.error.retryable,
                        reason=response.error.reason or "AGENT_ERROR",
                    )

    def _delta(self, kind: str, text: str) -> None:
        if not text:
            return
        size = len(text.encode("utf-8", "surrogatepass"))
        if self._open_kind != kind:
            self._take(size + _PART_FRAMING)
            self._close_run()
            self._open_kind = kind
        else:
            self._take(size)
        self._open.append(text)
        event = self._event()
        delta = getattr(event, kind)
        delta.message_id = self.message_id
        delta.text = text
        self._emit(event)

    def _close_run(self) -> None:
        if self._open:
            part = message_pb2.Part()
            text = "".join(self._open)
            if self._open_kind == "text_delta":
                part.text.text = text
            else:
                part.reasoning.text = text
            self._parts.append(part)
        self._open = []
        self._open_kind = ""

    def _tool_call(self, call_event: events_pb2.ToolCallEvent) -> None:
        self._close_run()
        event = self._event()
        out = event.tool_call
        out.CopyFrom(call_event)
        out.call.call_id = out.call.call_id or f"call-{uuid7()}"
        self._check_call(out.call, "tool_call.call")
        parts = [message_pb2.Part(tool_call=out.call)]
        if call_event.HasField("result"):
            out.result.call_id = out.result.call_id or out.call.call_id
            out.result.name = out.result.name or out.call.name
            self._check_call_id(out.result.call_id, "tool_call.result.call_id")
            parts.append(message_pb2.Part(tool_result=out.result))
        self._add_parts(parts)
        self._emit(event)

    def _client_tool_request(self, request: events_pb2.ClientToolRequest) -> None:
        self._close_run()
        event = self._event()
        out = event.client_tool_request
        out.CopyFrom(request)
        for i, call in enumerate(out.calls):
            call.call_id = call.call_id or f"call-{uuid7()}"
            call.client_side = True
            self._check_call(call, f"client_tool_request.calls[{i}]")
        self._add_parts([message_pb2.Part(tool_call=call) for call in out.calls])
        for call in out.calls:
            self._pending_calls[call.call_id] = call.name
        self._emit(event)

    def _add_parts(self, parts: list[message_pb2.Part]) -> None:
        """Adds finished parts to the answer, counted against its size limit (`_take`)."""
        self._take(sum(p.ByteSize() + _PART_FRAMING for p in parts))
        self._parts += parts

    def _check_call(self, call: message_pb2.ToolCallPart, field: str) -> None:
        """Holds an agent's tool call to the rules a caller's is held to (`convert.new_message_from_pb`, and
        the call ids of a continue's results). A call id the database cannot hold would lose the assistant
        message, and one a caller cannot send back would leave a paused turn that can never be continued.
        A call that breaks them is the agent's failure, like a malformed stream: nothing of its event is
        relayed or kept, and the turn ends as when the agent fails mid-stream, its output so far stored as
        an ERROR message. `field` names the call in the agent's `RespondResponse`."""
        self._check_call_id(call.call_id, f"{field}.call_id")
        if not call.name:
            raise self._invalid_call(InvalidArgument.field(f"{field}.name", "is required"))
        if call.call_id in self._call_ids:  # a result, or a continue, could not tell the two apart
            raise self._invalid_call(
                InvalidArgument.field(f"{field}.call_id", f"{call.call_id!r} names another call of this turn")
            )
        self._call_ids.add(call.call_id)

    def _take(self, size: int) -> None:
        """Counts `size` more bytes of the answer. An answer may not outgrow the message a caller may
        append (`SESSIOND_MAX_MESSAGE_BYTES`): a larger one would be stored, then break every read of the
        history and every later turn's request. Past it, the agent is stopped and the turn finishes
        LENGTH with what came before, as a model cut off at its token limit does."""
        if self._answer_bytes + size > self.runner.service.limits.max_message_bytes:
            raise _AnswerFull
        self._answer_bytes += size

    def _check_call_id(self, call_id: str, field: str) -> None:
        try:
            check_call_id(call_id, field, self.runner.service.limits)
        except InvalidArgument as exc:
            raise self._invalid_call(exc) from None

    def _invalid_call(self, exc: InvalidArgument) -> AgentFailure:
        return AgentFailure(
            f"agent {self.agent.agent_id!r} sent an invalid tool call: {exc.message}", retryable=False
        )

    async def _conclude(self, reason: FinishReason, error: events_pb2.TurnError | None) -> None:
        self.concluding = True
        self._close_run()
        svc = self.runner.service
        if error is not None:
            event = self._event()
            event.error.CopyFrom(error)
            self._emit(event)
        pending = self._pending_calls if reason is FinishReason.CLIENT_TOOL_CALLS else {}
        if self._parts and self.stop_mode is not StopMode.ROLLBACK and self.ended is None:
            # Stopped, by a caller or by a shutdown: what the agent produced so far.
            stopped = reason is FinishReason.CANCELLED or (error is not None and error is self.interrupted)
            status = (
                MessageStatus.INTERRUPTED
                if stopped
                else MessageStatus.ERROR
                if reason is FinishReason.ERROR
                else MessageStatus.COMPLETE
            )
            message = NewMessage(
                message_id=self.message_id,
                role=Role.ASSISTANT,
                content=message_pb2.Message(parts=self._parts).SerializeToString(),
                status=status,
                turn_id=self.turn_id,
                tool_call_ids=tuple(p.tool_call.call_id for p in self._parts if p.HasField("tool_call")),
                tool_result_ids=tuple(
                    p.tool_result.call_id for p in self._parts if p.HasField("tool_result")
                ),
            )
            failure: events_pb2.TurnError | None = None
            try:
                _, stored = await svc.append_messages(
                    session_id=self.session_id, messages=[message], lease=self.lease
                )
            except DomainError as exc:  # the session ended or went away, or the lease ended, under the turn
                failure = self.ended or events_pb2.TurnError(reason=exc.reason, message=exc.message)
            except Exception:
                log.exception("turn %s: storing the assistant message failed", self.turn_id)
                failure = _internal_error()
            if failure is None:
                event = self._event()
                event.message_completed.message.CopyFrom(message_to_pb(stored[0], ui_view=False))
                self._emit(event)
            else:
                reason, pending = FinishReason.ERROR, {}
                if error is None:
                    event = self._event()
                    event.error.CopyFrom(failure)
                    self._emit(event)
        final = self._event()
        final.turn_finished.reason = int(reason)  # type: ignore[assignment]
        self.span.set_attribute("sessiond.turn.finish_reason", reason.name)
        if reason is FinishReason.ERROR:
            last = next((e.error for e in reversed(self.emitted) if e.WhichOneof("kind") == "error"), None)
            if last is not None:
                self.span.set_attribute("sessiond.turn.error_reason", last.reason)
            self.span.set_status(Status(StatusCode.ERROR, last.message if last is not None else None))
        try:
            released = await self.runner.turns.finish(
                self.turn_id,
                owner=self.runner.owner,
                reason=reason,
                pending_calls=pending,
                events=encode_log(compact([*self.emitted, final])),
                now=svc.clock.now(),
            )
            if not released and self.ended is None:
                log.warning("turn %s lost its lease before it finished", self.turn_id)
        except Exception:
            log.warning(
                "could not release the lease of turn %s; it runs out by itself", self.turn_id, exc_info=True
            )
        # Watchers learn of the end before the next turn can start here; followers last, once the lease
        # is free, so that a caller who saw TurnFinished can start the next turn at once.
        self._publish_later(final)
        await self._published()
        self.runner._forget(self)
        self._deliver(final, last=True)


def _ended_error(session_id: str, cause: str) -> events_pb2.TurnError:
    """What the caller of a turn whose lease a session change ended learns (design: Turns)."""
    if cause == "deleted":
        return events_pb2.TurnError(
            reason="SESSION_NOT_FOUND",
            message=f"session {session_id!r} was deleted while the turn ran; its output was not stored",
        )
    return events_pb2.TurnError(
        reason=f"SESSION_{cause.upper()}",  # SESSION_CLEARED, SESSION_RESTORED, SESSION_ENDED
        message=f"session {session_id!r} was {cause} while the turn ran; its output was not stored",
    )


# Bytes a part adds to a stored message besides its text: the tags and lengths of Part, of its kind's
# message and of the text field (at most 1 + 5 bytes each).
_PART_FRAMING = 18


class _AnswerFull(Exception):
    """The agent's answer reached the size a stored message may have (`Turn._take`)."""


def _turn_begun(begin: asyncio.Future[Turn | Busy | Existing]) -> Turn | None:
    """The turn a finished `_begin` started, if it started one (its error, if any, is nobody's now)."""
    if begin.cancelled() or begin.exception() is not None:
        return None
    outcome = begin.result()
    return outcome if isinstance(outcome, Turn) else None


def _internal_error() -> events_pb2.TurnError:
    return events_pb2.TurnError(
        reason="INTERNAL", message="the turn failed; the server logged the details", retryable=True
    )


class Replay:
    """The stored events of a turn that ran (deltas merged): what a retried request id gets."""

    def __init__(self, record: TurnRecord, events: list[TurnEvent]) -> None:
        self.turn_id = record.turn_id
        self._events = events

    @property
    def finished(self) -> bool:
        return True

    async def events(self) -> AsyncIterator[TurnEvent]:
        for event in self._events:
            yield event

    def stop(self, mode: StopMode) -> bool:
        return False


# --- the runner ------------------------------------------------------------------------------------------


STOP_SIGNAL = "stop_turn"


async def _turn_finished(events: Subscription, turn_id: str) -> None:
    """Returns when `events` brings the TurnFinished of `turn_id`; the caller bounds the wait."""
    while (event := await events.get()) is not None:
        if event.turn.turn_id == turn_id and event.turn.HasField("turn_finished"):
            return
    await asyncio.Event().wait()  # cut off: nothing more comes here, and the caller's timeout ends this


class TurnRunner:
    """Runs the turns of this process and holds their leases.

    `lease_seconds` bounds how long a crashed process keeps a session's turn from others; the lease is
    renewed every fifth of it, and a stop asked on another replica arrives with the next renewal.
    """

    def __init__(
        self,
        service: SessionsService,
        turns: TurnStore,
        backends: Backends,
        *,
        lease_seconds: float = 15.0,
        retry_after_seconds: float = 1.0,
        lease_clock: Clock | None = None,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        self.service = service
        self.tracer = tracer
        self.turns = turns
        self.backends = backends
        self.clock = service.clock
        self.lease = timedelta(seconds=lease_seconds)
        self.renew_interval = lease_seconds / 5
        self.retry_after_seconds = retry_after_seconds
        self.lease_clock: Clock = lease_clock or SystemClock()
        self.owner = uuid7()  # this process, as lease rows name it
        self._running: dict[str, Turn] = {}  # by session id
        self._by_id: dict[str, Turn] = {}
        self._waiting: Counter[str] = Counter()
        self._waiting_changed: asyncio.Condition | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._renew_now = asyncio.Event()  # a stop for a turn here was asked on another replica
        self._early_stops: dict[str, StopMode] = {}  # see `_stop_and_wait`
        self._renewing: asyncio.Lock | None = None  # one renewal at a time (`renew_leases`)
        self._closed = False
        self._closing = asyncio.Event()  # set with `_closed`: wakes the callers waiting for a turn to end
        service.bus.on_signal(STOP_SIGNAL, self._on_stop_signal)
        service.on_turns_ended(self._on_turns_ended)

    # --- queries ---

    def running_count(self) -> int:
        """Turns running in this process."""
        return len(self._by_id)

    def waiting(self, session_id: str) -> int:
        """Callers here waiting for the session's running turn to end (enqueue, interrupt, rollback)."""
        return self._waiting[session_id]

    async def wait_for_waiting(self, session_id: str, count: int) -> None:
        """Returns once at least `count` callers wait for the session's running turn."""
        condition = self._condition()
        async with condition:
            await condition.wait_for(lambda: self._waiting[session_id] >= count)

    # --- use cases ---

    async def execute(
        self, request: TurnRequest, *, started: Callable[[TurnStream], None] | None = None
    ) -> TurnStream:
        """Starts a turn (after the turn running in the session, per the request's strategy), or joins the
        turn the request id started before. Returns once the turn has stored its input.

        `started` is handed the turn as soon as it exists, even when the caller is cancelled while its
        lease is taken: a caller that cancels its own start (a Connect frame interrupted by the next) can
        still stop that turn and wait for it."""
        turn_id = uuid7()
        rolled_back: list[TurnRecord] = []
        while True:
            # Also after waiting for the turn before this one: a drain that began meanwhile starts nothing.
            if self._closed:
                raise _refused_by_drain()
            # Taking the lease commits even when the caller goes away meanwhile (a cancel, a deadline, a
            # Connect frame interrupting the one before): it runs shielded, and a turn it started is left
            # to its caller's on_disconnect like any other.
            begin = asyncio.ensure_future(self._begin(request, turn_id, rolled_back))
            try:
                outcome = await asyncio.shield(begin)
            except asyncio.CancelledError:
                # The begin is one short write: wait for it, so that a turn it started is handed over
                # before the cancellation goes on.
                while not begin.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait([begin])
                turn_begun = _turn_begun(begin)
                if turn_begun is not None:
                    if started is not None:
                        started(turn_begun)
                    if request.on_disconnect is DisconnectBehavior.CANCEL:
                        turn_begun.stop(StopMode.CANCEL)
                raise
            if isinstance(outcome, Existing):
                return await self._join(outcome.turn)
            if isinstance(outcome, Turn):
                turn = outcome
                if started is not None:
                    started(turn)
                break
            running = outcome.running
            if request.strategy is MultitaskStrategy.REJECT:
                raise turn_in_progress(request.session_id, running.turn_id, self.retry_after_seconds)
            if request.strategy is MultitaskStrategy.ENQUEUE:
                await self._wait(running)
                continue
            mode = StopMode.ROLLBACK if request.strategy is MultitaskStrategy.ROLLBACK else StopMode.CANCEL
            if mode is StopMode.ROLLBACK:
                rolled_back.append(running)
            await self._stop_and_wait(running, mode)
        try:
            await turn.started.wait()
        except asyncio.CancelledError:
            if request.on_disconnect is DisconnectBehavior.CANCEL:
                turn.stop(StopMode.CANCEL)
            raise
        if turn.start_error is not None:
            raise turn.start_error
        return turn

    async def stop(self, session_id: str, turn_id: str = "") -> tuple[bool, str]:
        """Stops the session's running turn (only `turn_id`, when given), wherever it runs. Returns whether
        a running turn was asked to stop, and its id."""
        local = self._running.get(session_id)
        if local is not None and (not turn_id or local.turn_id == turn_id):
            return local.stop(StopMode.CANCEL), local.turn_id
        record = await self.turns.request_stop(session_id, turn_id, StopMode.CANCEL)
        if record is None or record.owner == self.owner or not record.leased(self.lease_clock.now()):
            return False, turn_id
        self.service.bus.signal(STOP_SIGNAL, {"turn_id": record.turn_id})
        return True, record.turn_id

    @property
    def closed(self) -> bool:
        """Whether `close` began: the server is shutting down, and starts no more turns."""
        return self._closed

    async def close(self, grace: float = 10.0) -> None:
        """Stops the turns running here (their partial output is kept, for up to `grace` seconds) and closes
        the backends."""
        self._closed = True
        self._closing.set()
        running = list(self._by_id.values())
        for turn in running:
            turn.shut_down()
        if running:
            await asyncio.wait([asyncio.ensure_future(t.done.wait()) for t in running], timeout=grace)
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        await self.backends.close()

    # --- internals ---

    async def _begin(
        self, request: TurnRequest, turn_id: str, rolled_back: Sequence[TurnRecord]
    ) -> Turn | Busy | Existing:
        """Takes the lease and, when it is ours, starts the turn in the same step: a turn whose lease was
        taken is always running here (or finished), never a row nobody runs."""
        outcome = await self._acquire(request, turn_id)
        if not isinstance(outcome, Acquired):
            return outcome
        turn = Turn(self, outcome.turn, request, outcome.agent, outcome.session, rolled_back)
        self._register(turn)
        turn.task = asyncio.create_task(turn.run(), name=f"turn-{turn_id}")
        return turn

    async def _acquire(self, request: TurnRequest, turn_id: str) -> Acquisition:
        lease_now = self.lease_clock.now()
        return await self.turns.acquire(
            request,
            turn_id=turn_id,
            owner=self.owner,
            lease_now=lease_now,
            lease_until=lease_now + self.lease,
            now=self.clock.now(),
        )

    async def _join(self, record: TurnRecord) -> TurnStream:
        local = self._by_id.get(record.turn_id)
        if local is not None:
            return local
        if record.state is TurnState.RUNNING and record.leased(self.lease_clock.now()):
            record = await self._wait_foreign(record) or record
        if record.state is TurnState.FINISHED and record.events is not None:
            return Replay(record, decode_log(record.events))
        # Its process went away before it finished: nothing but its end is known.
        error, finished = TurnEvent(), TurnEvent()
        for i, event in enumerate((error, finished), start=1):
            event.session_id, event.turn_id, event.index = record.session_id, record.turn_id, i
            stamp(event.time, self.clock.now())
        error.error.CopyFrom(
            events_pb2.TurnError(
                reason="TURN_LOST", message="the process running the turn went away", retryable=True
            )
        )
        finished.turn_finished.reason = events_pb2.FINISH_REASON_ERROR
        return Replay(record, [error, finished])

    async def _stop_and_wait(self, running: TurnRecord, mode: StopMode) -> None:
        local = self._by_id.get(running.turn_id)
        if local is not None:
            local.stop(mode)
        elif running.owner == self.owner:
            # Ours, its lease committed, but not started yet (on PostgreSQL another caller may see the row
            # before the task that took it goes on): it applies the stop once it registers.
            self._early_stops[running.turn_id] = max(self._early_stops.get(running.turn_id, mode), mode)
        else:
            await self.turns.request_stop(running.session_id, running.turn_id, mode)
            self.service.bus.signal(STOP_SIGNAL, {"turn_id": running.turn_id})
        await self._wait(running)
        self._early_stops.pop(running.turn_id, None)

    async def _wait(self, running: TurnRecord) -> None:
        """Waits until `running` ended (or its owner's lease ran out). A drain that begins meanwhile ends
        the wait with SERVER_SHUTTING_DOWN: the caller goes to another replica rather than hold the drain
        for a turn that may run for its whole grace period (or, on another replica, longer)."""
        sid = running.session_id
        await self._set_waiting(sid, +1)
        try:
            local = self._by_id.get(running.turn_id)
            ended = asyncio.ensure_future(
                local.done.wait() if local is not None else self._wait_foreign(running)
            )
            closing = asyncio.ensure_future(self._closing.wait())
            try:
                await asyncio.wait([ended, closing], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in (ended, closing):
                    waiter.cancel()
                await asyncio.gather(ended, closing, return_exceptions=True)
            if ended.cancelled():
                raise _refused_by_drain()
            ended.result()  # its failure, if it failed
        finally:
            await self._set_waiting(sid, -1)

    async def _wait_foreign(self, running: TurnRecord) -> TurnRecord | None:
        """Waits for a turn of another process to end or lose its lease: woken by its TurnFinished event
        (which a bus between replicas carries here), and polling its row every lease renewal interval,
        which keeps this correct when no event comes."""
        with self.service.bus.subscribe(running.session_id) as events:
            while True:
                current = await self.turns.get(running.session_id, running.turn_id)
                if current is None or not current.leased(self.lease_clock.now()):
                    return current
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_turn_finished(events, running.turn_id), self.renew_interval)

    def _on_stop_signal(self, data: Mapping[str, Any]) -> None:
        turn = self._by_id.get(str(data.get("turn_id")))
        if turn is None:
            return
        if data.get("ended"):  # its session was deleted, cleared or restored on another replica
            turn.ended_by(str(data["ended"]))
        else:
            self._renew_now.set()  # the renewal reads the stop from the lease row and applies it

    def _on_turns_ended(self, session_id: str, turn_ids: Sequence[str], cause: str) -> None:
        """A delete, a clear or a restore ended these turns' leases, or an end made their session read-only:
        stop them here, or tell their replica (which otherwise learns it at its next renewal, or, for an
        end, when its answer is refused)."""
        for turn_id in turn_ids:
            local = self._by_id.get(turn_id)
            if local is not None:
                local.ended_by(cause)
            else:
                self.service.bus.signal(STOP_SIGNAL, {"turn_id": turn_id, "ended": cause})

    def _condition(self) -> asyncio.Condition:
        if self._waiting_changed is None:
            self._waiting_changed = asyncio.Condition()
        return self._waiting_changed

    async def _set_waiting(self, session_id: str, delta: int) -> None:
        self._waiting[session_id] += delta
        if self._waiting[session_id] <= 0:
            del self._waiting[session_id]
        condition = self._condition()
        async with condition:
            condition.notify_all()

    def _register(self, turn: Turn) -> None:
        self._running[turn.session_id] = turn
        self._by_id[turn.turn_id] = turn
        early = self._early_stops.pop(turn.turn_id, None)
        if early is not None:
            turn.stop(early)
        if self._closed:  # it took its lease as the server began to shut down
            turn.shut_down()
        if self._renewer is None and not self._closed:
            self._renewer = asyncio.create_task(self._keep_leases(), name="turn-leases")

    def _forget(self, turn: Turn) -> None:
        self._detach(turn)
        self._by_id.pop(turn.turn_id, None)

    def _detach(self, turn: Turn) -> None:
        """The turn is no longer its session's running turn (its lease ended): a StopTurn of the session,
        which may be a new one under the same id, does not reach it."""
        if self._running.get(turn.session_id) is turn:
            del self._running[turn.session_id]

    async def _publish(self, event: TurnEvent, lease: TurnLease | None = None) -> None:
        try:
            await self.service.publish_turn_event(event, lease=lease)
        except Exception:
            log.warning("could not publish event %d of turn %s", event.index, event.turn_id, exc_info=True)

    async def _keep_leases(self) -> None:
        """Renews the leases of the turns running here, and applies the stops other replicas asked for."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._renew_now.wait(), self.renew_interval)
            self._renew_now.clear()
            try:
                await self.renew_leases()
            except Exception:
                log.warning("could not renew the turn leases; retrying", exc_info=True)

    async def renew_leases(self) -> None:
        """One renewal: pushes the leases of the turns running here, applies the stops asked for them
        elsewhere, and records each turn as activity on its session when due (a tenth of its timeout
        after the last, so that a turn keeps its session alive as heartbeats would, without rewriting
        the session at every renewal)."""
        if self._renewing is None:
            self._renewing = asyncio.Lock()
        async with self._renewing:
            await self._renew_leases()

    async def _renew_leases(self) -> None:
        if not self._by_id:
            return
        asked_at = time.monotonic()
        held = await self.turns.renew(self.owner, list(self._by_id), self.lease_clock.now() + self.lease)
        now = self.clock.now()
        due: list[Turn] = []
        for turn in list(self._by_id.values()):
            if turn.registered_at > asked_at or turn.concluding:
                continue
            mode = held.get(turn.turn_id)
            if mode is None:
                log.warning(
                    "turn %s lost its lease (taken over after it ran out, or its session deleted, cleared or "
                    "restored); stopping it",
                    turn.turn_id,
                )
                # Ended as when a session change is told here at once, but without knowing which: its
                # caller learns TURN_LOST, and its events no longer go to the session's watchers (the id may
                # name a session created again since).
                lost = events_pb2.TurnError(
                    reason="TURN_LOST",
                    message=f"turn {turn.turn_id!r} lost its lease (taken over, or its session deleted, "
                    "cleared or restored elsewhere); its output was not stored",
                )
                turn.end(lost, session_gone=True)
                continue
            if mode:
                turn.stop(mode)
            if now - turn.active_at >= turn.session.effective.timeout / 10:
                due.append(turn)
        for turn in due:
            try:
                session = await self.turns.record_activity(turn.lease, now)
            except Exception:
                log.warning("could not record turn %s as activity", turn.turn_id, exc_info=True)
                continue
            turn.active_at = now
            if session is not None:
                turn.session = session


def _refused_by_drain() -> DomainError:
    return shutting_down("send the turn to another replica, or here once the server is back")
