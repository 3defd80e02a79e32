"""TurnService: Execute (server stream), StopTurn, Connect (bidirectional). Validation and conversion here;
the turns themselves run in `sessiond.turns.runner`.

Failures before a turn starts (bad input, missing or expired session, TURN_IN_PROGRESS under the reject
strategy) fail the RPC with a rich status. Failures during a turn are events: TurnError, then
TurnFinished with FINISH_REASON_ERROR.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from agentsessions.v1 import (
    events_pb2,
    message_pb2,
    turn_service_pb2,
    turn_service_pb2_grpc,
)

from ..domain.errors import DomainError, FieldViolation, InvalidArgument, ResourceExhausted, shutting_down
from ..domain.model import Role
from ..domain.turns import DisconnectBehavior, MultitaskStrategy, StopMode, TurnKind, TurnRequest
from ..domain.validation import Limits, check_session_id, check_text, check_variables
from ..events.bus import Subscription
from ..service_layer import SessionsService
from ..turns.runner import TurnRunner, TurnStream
from . import convert
from .errors import Undecodable, error_fields, streaming, unary, unexpected_error

log = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]
MAX_TRIGGER_NAME = 128
MAX_TURN_ID = 64


def turn_request_from_pb(request: turn_service_pb2.ExecuteRequest, limits: Limits) -> TurnRequest:
    """Validates an ExecuteRequest and turns it into the runner's TurnRequest."""
    check_session_id(request.session_id, limits)
    check_text(request.request_id, "request_id", limits.max_request_id_length)
    if request.multitask_strategy not in turn_service_pb2.MultitaskStrategy.values():
        raise InvalidArgument.field("multitask_strategy", f"unknown strategy {request.multitask_strategy}")
    if request.on_disconnect not in turn_service_pb2.DisconnectBehavior.values():
        raise InvalidArgument.field("on_disconnect", f"unknown behavior {request.on_disconnect}")
    common: dict[str, Any] = {
        "session_id": request.session_id,
        "request_id": request.request_id,
        "strategy": MultitaskStrategy(request.multitask_strategy or MultitaskStrategy.INTERRUPT),
        "on_disconnect": DisconnectBehavior(request.on_disconnect or DisconnectBehavior.CANCEL),
    }
    kind = request.WhichOneof("input")
    if kind == "message":
        if request.message.role not in (message_pb2.ROLE_UNSPECIFIED, message_pb2.ROLE_USER):
            raise InvalidArgument.field("message.role", "must be ROLE_USER (or unset)")
        message = convert.new_message_from_pb(request.message, limits, "message", default_role=int(Role.USER))
        return TurnRequest(kind=TurnKind.MESSAGE, message=message, **common)
    if kind == "trigger":
        trigger = request.trigger
        if not trigger.name:
            raise InvalidArgument.field("trigger.name", "is required")
        check_text(trigger.name, "trigger.name", MAX_TRIGGER_NAME)
        check_variables(convert.struct_to_dict(trigger.input, "trigger.input"), limits, "trigger.input")
        return TurnRequest(kind=TurnKind.TRIGGER, trigger_name=trigger.name, trigger=trigger, **common)
    if kind == "continue_turn":
        cont = request.continue_turn
        if not cont.turn_id:
            raise InvalidArgument.field("continue_turn.turn_id", "is required")
        check_text(cont.turn_id, "continue_turn.turn_id", MAX_TURN_ID)
        if not cont.tool_results:
            raise InvalidArgument.field("continue_turn.tool_results", "at least one result is required")
        seen: set[str] = set()
        for i, result in enumerate(cont.tool_results):
            field = f"continue_turn.tool_results[{i}].call_id"
            if not result.call_id:
                raise InvalidArgument.field(field, "is required")
            if result.call_id in seen:
                raise InvalidArgument.field(field, f"{result.call_id!r} appears twice")
            seen.add(result.call_id)
        results = message_pb2.Message(
            role=message_pb2.ROLE_TOOL,
            parts=[message_pb2.Part(tool_result=r) for r in cont.tool_results],
        )
        try:
            tool_results = convert.new_message_from_pb(results, limits, "continue_turn")
        except InvalidArgument as exc:  # named as the caller sent them: tool_results[i], not parts[i]
            raise _renamed(exc, "continue_turn.parts", "continue_turn.tool_results") from None
        return TurnRequest(
            kind=TurnKind.CONTINUE,
            continue_turn_id=cont.turn_id,
            continue_turn=cont,
            tool_results=tool_results,
            result_call_ids=tuple(r.call_id for r in cont.tool_results),
            **common,
        )
    raise InvalidArgument.field("input", "set one of message, trigger and continue_turn")


def _renamed(exc: InvalidArgument, old: str, new: str) -> InvalidArgument:
    """`exc` with its fields under `old` named under `new` (`old[i].tool_result.x` as `new[i].x`)."""

    def rename(field: str) -> str:
        if not field.startswith(old):
            return field
        return new + field[len(old) :].replace(".tool_result", "", 1)

    violations = [FieldViolation(rename(v.field), v.description) for v in exc.violations]
    first = violations[0] if violations else None
    message = f"{first.field}: {first.description}" if first is not None else exc.message
    metadata = {**exc.metadata, **({"field": first.field} if first is not None else {})}
    return InvalidArgument(message, reason=exc.reason, metadata=metadata, violations=violations)


def connect_error(exc: DomainError) -> turn_service_pb2.ConnectResponse:
    return turn_service_pb2.ConnectResponse(error=turn_service_pb2.ConnectError(**error_fields(exc)))


class TurnServicer(turn_service_pb2_grpc.TurnServiceServicer):
    def __init__(self, service: SessionsService, runner: TurnRunner, *, watch_buffer: int = 1024) -> None:
        self.svc = service
        self.runner = runner
        self.watch_buffer = watch_buffer
        self._connections: set[_Connection] = set()

    def shut_down(self) -> None:
        """The server is draining: every Connect stream reads no more frames, relays the end of its
        running turn (which the runner stops) and then ends UNAVAILABLE / SERVER_SHUTTING_DOWN."""
        for connection in list(self._connections):
            connection.shut_down()

    @streaming
    async def Execute(
        self, request: turn_service_pb2.ExecuteRequest, context: Ctx
    ) -> AsyncIterator[events_pb2.TurnEvent]:
        turn_request = turn_request_from_pb(request, self.svc.limits)
        started: list[TurnStream] = []

        def call_ended(_: Any) -> None:
            # Runs when the call ends for any reason; a turn still going then lost its caller.
            if started and turn_request.on_disconnect is DisconnectBehavior.CANCEL:
                started[0].stop(StopMode.CANCEL)

        context.add_done_callback(call_ended)  # type: ignore[arg-type]  # the stub wants a class
        stream = await self.runner.execute(turn_request)
        started.append(stream)
        async for event in stream.events():
            yield event

    @unary
    async def StopTurn(
        self, request: turn_service_pb2.StopTurnRequest, context: Ctx
    ) -> turn_service_pb2.StopTurnResponse:
        check_session_id(request.session_id, self.svc.limits)
        check_text(request.turn_id, "turn_id", MAX_TURN_ID)
        stopped, turn_id = await self.runner.stop(request.session_id, request.turn_id)
        return turn_service_pb2.StopTurnResponse(stopped=stopped, turn_id=turn_id)

    @streaming
    async def Connect(
        self, request_iterator: AsyncIterator[turn_service_pb2.ConnectRequest], context: Ctx
    ) -> AsyncIterator[turn_service_pb2.ConnectResponse]:
        connection = _Connection(self.svc, self.runner, self.watch_buffer)

        def call_ended(_: Any) -> None:
            connection.close()

        context.add_done_callback(call_ended)  # type: ignore[arg-type]  # the stub wants a class
        self._connections.add(connection)
        if self.runner.closed:  # it came in as the server began to shut down
            connection.shut_down()
        try:
            async for response in connection.run(request_iterator):
                yield response
        finally:
            self._connections.discard(connection)
            connection.close()


class _Execution:
    """One execute frame of a Connect stream: the turn it started and the task relaying its events."""

    def __init__(self, request: TurnRequest, previous: _Execution | None) -> None:
        self.request = request
        self.previous = previous  # the frame before, until this one has interrupted it
        self.stream: TurnStream | None = None
        self.task: asyncio.Task[None] | None = None
        self.relaying = False
        self._stopping: asyncio.Future[None] | None = None

    def started(self, stream: TurnStream) -> None:
        """The runner's hand-over of the turn this frame started (also when its start was cancelled)."""
        self.stream = stream

    async def interrupt(self, send: Callable[[events_pb2.TurnEvent], None]) -> None:
        """Stops the turn and waits until its last event was relayed and it let the session go: frames
        stay in order, and the next frame finds the session free whatever its strategy. Called again (by
        a later frame), it waits for the same stop."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(send))
        await asyncio.shield(self._stopping)

    async def _stop(self, send: Callable[[events_pb2.TurnEvent], None]) -> None:
        if self.stream is not None:
            self.stream.stop(StopMode.CANCEL)
        elif self.task is not None:
            # Still starting: stop waiting for the session. A turn started all the same is handed over
            # (`started`) by the time the task ends.
            self.task.cancel()
        if self.task is not None:
            await asyncio.wait([self.task])
        if self.previous is not None:  # this frame was cut off while it interrupted the one before
            await self.previous.interrupt(send)
        if self.stream is not None and not self.relaying:
            self.stream.stop(StopMode.CANCEL)
            self.relaying = True
            async for event in self.stream.events():
                send(event)

    def abandon(self) -> None:
        """The caller went away: stop the turn unless it asked to run on, and stop relaying. (A turn still
        starting is stopped by the runner when its start is cancelled, per the same behavior.)"""
        if self.stream is not None and self.request.on_disconnect is DisconnectBehavior.CANCEL:
            self.stream.stop(StopMode.CANCEL)
        if self.task is not None:
            self.task.cancel()
        if self._stopping is not None:
            self._stopping.cancel()


class _Connection:
    """The state of one Connect stream. Frames are read in a task of their own so that a stop or a
    heartbeat is served while a turn streams; every response goes through one queue, in order."""

    def __init__(self, service: SessionsService, runner: TurnRunner, watch_buffer: int = 1024) -> None:
        self.svc = service
        self.runner = runner
        # What the stream sends, in order; None ends it, an error ends it with that status.
        self.out: asyncio.Queue[turn_service_pb2.ConnectResponse | DomainError | None] = asyncio.Queue()
        # Session events wait while `watch_buffer` responses are queued (`_pump_session_events`), so a
        # caller that stops reading is cut off with WATCH_LAGGING as a watcher is, not buffered for ever.
        self.watch_buffer = watch_buffer
        self.room = asyncio.Event()
        self.room.set()
        self.session_id = ""
        self.latest: _Execution | None = None
        self.executions: set[_Execution] = set()
        self.reader: asyncio.Task[None] | None = None
        self.events: asyncio.Task[None] | None = None
        self.subscription: Subscription | None = None
        self.closed = False
        self.draining: asyncio.Task[None] | None = None

    async def run(
        self, requests: AsyncIterator[turn_service_pb2.ConnectRequest]
    ) -> AsyncIterator[turn_service_pb2.ConnectResponse]:
        if self.draining is None:
            self.reader = asyncio.create_task(self._read(requests))
        while (response := await self.out.get()) is not None:
            if self.out.qsize() < self.watch_buffer:
                self.room.set()
            if isinstance(response, DomainError):
                raise response
            yield response

    def shut_down(self) -> None:
        """Reads no more frames; once the turns started here have relayed their last event (the runner
        stops them), the stream ends UNAVAILABLE / SERVER_SHUTTING_DOWN so the caller reconnects."""
        if self.closed or self.draining is not None:
            return
        if self.reader is not None:
            self.reader.cancel()
        self.draining = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        if self.reader is not None:
            await asyncio.wait([self.reader])
        relaying = [e.task for e in self.executions if e.task is not None]
        if relaying:
            await asyncio.wait(relaying)
        where = {"session_id": self.session_id} if self.session_id else {}
        self.out.put_nowait(shutting_down("open the stream again", **where))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in (self.reader, self.events, self.draining):
            if task is not None:
                task.cancel()
        for execution in list(self.executions):
            execution.abandon()
        if self.subscription is not None:
            self.subscription.close()

    def _send_error(self, exc: DomainError) -> None:
        self.out.put_nowait(connect_error(exc))

    async def _read(self, requests: AsyncIterator[turn_service_pb2.ConnectRequest]) -> None:
        try:
            async for frame in requests:
                try:
                    if isinstance(frame, Undecodable):
                        raise frame.error()
                    kind = frame.WhichOneof("frame")
                    if kind == "execute":
                        self._execute(frame.execute)
                    elif kind == "stop":
                        await self._stop(frame.stop)
                    elif kind == "heartbeat":
                        await self._heartbeat(frame.heartbeat)
                    else:
                        raise InvalidArgument.field("frame", "set one of execute, stop and heartbeat")
                except DomainError as exc:
                    self._send_error(exc)
                except Exception as exc:  # the frame's failure (the database's, a bug), not the stream's
                    self._send_error(unexpected_error(exc, "a Connect frame"))
            # The caller is done sending: finish relaying the turn that runs, then end the stream.
            if self.latest is not None and self.latest.task is not None:
                await asyncio.wait([self.latest.task])
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("a Connect stream failed")
            self.out.put_nowait(connect_error(DomainError("internal error; the server logged the details")))
        finally:
            if self.draining is None:  # else the stream ends once its turns have relayed their end
                self.out.put_nowait(None)

    def _session(self, session_id: str, field: str) -> str:
        """The frame's session, or the stream's (kept from the first frame that named one)."""
        session_id = session_id or self.session_id
        if not session_id:
            raise InvalidArgument.field(field, "is required on the stream's first frame")
        check_session_id(session_id, self.svc.limits, field)
        if not self.session_id:
            self.session_id = session_id
            self._follow_session_events()
        return session_id

    def _execute(self, request: turn_service_pb2.ExecuteRequest) -> None:
        pb = turn_service_pb2.ExecuteRequest()
        pb.CopyFrom(request)
        pb.session_id = self._session(request.session_id, "execute.session_id")
        execution = _Execution(turn_request_from_pb(pb, self.svc.limits), self.latest)
        self.latest = execution
        self.executions.add(execution)
        execution.task = asyncio.create_task(self._relay(execution))
        execution.task.add_done_callback(lambda _: self.executions.discard(execution))

    def _send_turn_event(self, event: events_pb2.TurnEvent) -> None:
        self.out.put_nowait(turn_service_pb2.ConnectResponse(turn_event=event))

    async def _relay(self, execution: _Execution) -> None:
        if execution.previous is not None:  # a new execute interrupts the turn the previous one started
            await execution.previous.interrupt(self._send_turn_event)
            execution.previous = None
        try:
            stream = await self.runner.execute(execution.request, started=execution.started)
        except DomainError as exc:
            self._send_error(exc)
            return
        except Exception as exc:
            self._send_error(unexpected_error(exc, "an execute frame"))
            return
        execution.relaying = True
        async for event in stream.events():
            self._send_turn_event(event)

    async def _stop(self, request: turn_service_pb2.StopTurnRequest) -> None:
        session_id = self._session(request.session_id, "stop.session_id")
        check_text(request.turn_id, "stop.turn_id", MAX_TURN_ID)
        await self.runner.stop(session_id, request.turn_id)

    async def _heartbeat(self, request: turn_service_pb2.HeartbeatFrame) -> None:
        session_id = self._session(request.session_id, "heartbeat.session_id")
        session = await self.svc.heartbeat(session_id=session_id)
        self.out.put_nowait(
            turn_service_pb2.ConnectResponse(session=convert.session_to_pb(session, self.svc.clock.now()))
        )

    def _follow_session_events(self) -> None:
        """Relays the session's events other than turn events (the stream's own turns come in order
        through turn_event frames)."""
        self.subscription = self.svc.bus.subscribe(self.session_id, max_buffer=self.watch_buffer)
        self.events = asyncio.create_task(self._pump_session_events())

    async def _pump_session_events(self) -> None:
        while self.subscription is not None:
            async for event in self.subscription:
                if event.WhichOneof("kind") == "turn":
                    continue
                while self.out.qsize() >= self.watch_buffer:  # the caller reads slowly: the bus buffers
                    self.room.clear()
                    await self.room.wait()
                self.out.put_nowait(turn_service_pb2.ConnectResponse(session_event=event))
            if self.subscription.ended:  # the server is shutting down (`shut_down` ends the stream)
                return
            # Cut off for falling behind: say so, and go on with live events.
            self.subscription.close()
            self._send_error(
                ResourceExhausted(
                    "session events were dropped because this stream fell behind; read them with "
                    "WatchSession from the last event id seen",
                    reason="WATCH_LAGGING",
                )
            )
            self.subscription = self.svc.bus.subscribe(self.session_id, max_buffer=self.watch_buffer)
