"""Server streams and the Connect stream, for the async and the sync client.

A stream object is returned as soon as the call starts. Iterate it for the messages; ``cancel()`` (or
leaving its ``with`` / ``async with`` block) ends the call, and iteration then stops quietly. For
Execute, cancelling stops the turn unless it was started with ``on_disconnect=CONTINUE``. gRPC errors
are raised while iterating as :class:`agentsessions.errors.AgentSessionsError`.

WatchSession streams resume by themselves (see :class:`WatchCursor`).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

import grpc
import grpc.aio

from agentsessions import _requests
from agentsessions.errors import AgentSessionsError, client_closed, from_grpc_error, stream_closed
from agentsessions.retry import RetryPolicy
from agentsessions.v1 import events_pb2, session_service_pb2, turn_service_pb2

__all__ = [
    "WATCH_LAGGING",
    "WATCH_RESUME",
    "AsyncConnection",
    "AsyncStream",
    "Connection",
    "Stream",
    "WatchCursor",
]

ItemT = TypeVar("ItemT")
ItemT_co = TypeVar("ItemT_co", covariant=True)
ItemT_contra = TypeVar("ItemT_contra", contravariant=True)

#: ErrorInfo reason of RESOURCE_EXHAUSTED when the server ends a watch whose reader fell behind.
WATCH_LAGGING = "WATCH_LAGGING"

#: How a watch reconnects after UNAVAILABLE: more patient than a unary call's retries, because a watch
#: is expected to outlive a server restart. ``max_attempts`` counts reconnects with no event in between.
WATCH_RESUME = RetryPolicy(max_attempts=10, initial_backoff=0.2, max_backoff=5.0)


class _AsyncCall(Protocol[ItemT_co]):
    def __aiter__(self) -> AsyncIterator[ItemT_co]: ...
    def cancel(self) -> bool: ...


class _SyncCall(Protocol[ItemT_co]):
    def __iter__(self) -> Iterator[ItemT_co]: ...
    def cancel(self) -> bool: ...


class _SyncStreamingCall(_SyncCall[ItemT_co], Protocol[ItemT_co]):
    def add_callback(self, callback: Callable[[], None]) -> bool: ...


class Resumption(Protocol[ItemT_contra]):
    """Decides whether a broken stream is opened again, and remembers where it broke off."""

    def observe(self, item: ItemT_contra) -> None: ...
    def backoff(self, error: AgentSessionsError) -> float | None: ...


class WatchCursor:
    """Resumption of WatchSession: reopens the watch after the last stored event seen.

    The watch is reopened when it fails with UNAVAILABLE (server restart, draining, network) or when the
    server ends it with RESOURCE_EXHAUSTED / ``WATCH_LAGGING`` (the reader fell behind the live feed):
    the new call asks for the events after the last ``event_id`` seen, which the server replays from
    storage, so the caller sees no gap and no duplicate. Only events with ``event_id > 0`` move the
    cursor; live-only events (turn deltas) are not replayed, so deltas sent during the break are lost.
    A watch opened with ``after_event_id=None`` (live only) has no cursor until its first stored event:
    a break before that resumes live-only and may miss events.
    """

    def __init__(self, request: session_service_pb2.WatchSessionRequest, resume: bool | RetryPolicy) -> None:
        """``resume``: True for :data:`WATCH_RESUME`, a policy of your own, or False to never reopen."""
        self._request = request
        self._policy: RetryPolicy | None = resume if isinstance(resume, RetryPolicy) else None
        if resume is True:
            self._policy = WATCH_RESUME
        self._failures = 0

    def request(self) -> session_service_pb2.WatchSessionRequest:
        """The request that opens (or reopens) the watch from the cursor."""
        return self._request

    def observe(self, item: events_pb2.SessionEvent) -> None:
        """Records an event delivered to the caller."""
        self._failures = 0
        if item.event_id > 0:
            self._request.after_event_id = item.event_id

    def backoff(self, error: AgentSessionsError) -> float | None:
        """Seconds to wait before reopening the watch after ``error``, or None to raise it."""
        self._failures += 1
        if self._policy is None:
            return None
        if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == WATCH_LAGGING:
            return 0.0 if self._failures < self._policy.max_attempts else None
        return self._policy.backoff(self._failures, error)


class AsyncStream(Generic[ItemT]):
    """A server stream of the async client: ``async for item in stream``; ``cancel()`` ends it."""

    def __init__(
        self, open_call: Callable[[], _AsyncCall[ItemT]], resumption: Resumption[ItemT] | None = None
    ) -> None:
        self._open_call = open_call
        self._resumption = resumption
        self._call = self._open()
        self._cancelled = False
        self._items = self._iterate()

    def _open(self) -> _AsyncCall[ItemT]:
        try:
            return self._open_call()
        except grpc.aio.UsageError as err:  # the client's channel is closed
            raise client_closed() from err

    def __aiter__(self) -> AsyncStream[ItemT]:
        return self

    async def __anext__(self) -> ItemT:
        return await self._items.__anext__()

    def cancel(self) -> None:
        """Ends the call; iteration stops quietly."""
        self._cancelled = True
        self._call.cancel()

    async def __aenter__(self) -> AsyncStream[ItemT]:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()

    async def _iterate(self) -> AsyncIterator[ItemT]:
        while True:
            try:
                async for item in self._call:
                    if self._resumption is not None:
                        self._resumption.observe(item)
                    yield item
                return
            except grpc.RpcError as err:
                if self._cancelled:
                    return
                error = from_grpc_error(err)
                delay = self._resumption.backoff(error) if self._resumption is not None else None
                if delay is None:
                    raise error from err
            except asyncio.CancelledError:
                # grpc.aio raises CancelledError after call.cancel() and when the channel closes; only a
                # cancelled task propagates it.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                if self._cancelled:
                    return
                raise client_closed() from None
            await asyncio.sleep(delay)
            if self._cancelled:
                return
            self._call = self._open()


class Stream(Generic[ItemT]):
    """A server stream of the sync client: ``for item in stream``; ``cancel()`` (from any thread) ends it."""

    def __init__(
        self, open_call: Callable[[], _SyncCall[ItemT]], resumption: Resumption[ItemT] | None = None
    ) -> None:
        self._open_call = open_call
        self._resumption = resumption
        self._call = self._open()
        self._cancelled = False
        # `cancel` may come from another thread while the iterating one reopens the call: either the
        # reopen sees the cancel, or the cancel sees the new call.
        self._lock = threading.Lock()
        self._items = self._iterate()

    def _open(self) -> _SyncCall[ItemT]:
        try:
            return self._open_call()
        except ValueError as err:  # grpc's "Cannot invoke RPC: Channel closed!"
            raise client_closed() from err

    def __iter__(self) -> Stream[ItemT]:
        return self

    def __next__(self) -> ItemT:
        return next(self._items)

    def cancel(self) -> None:
        """Ends the call; iteration stops quietly."""
        with self._lock:
            self._cancelled = True
            self._call.cancel()

    def __enter__(self) -> Stream[ItemT]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()

    def _iterate(self) -> Iterator[ItemT]:
        while True:
            try:
                for item in self._call:
                    if self._resumption is not None:
                        self._resumption.observe(item)
                    yield item
                return
            except grpc.RpcError as err:
                if self._cancelled:
                    return
                error = from_grpc_error(err)
                delay = self._resumption.backoff(error) if self._resumption is not None else None
                if delay is None:
                    raise error from err
            time.sleep(delay)
            with self._lock:
                if self._cancelled:
                    return
                self._call = self._open()


class AsyncConnection(AsyncStream[turn_service_pb2.ConnectResponse]):
    """A Connect stream of the async client, bound to one session.

    Send frames with the ``send_*`` methods; iterate for turn events, session events, heartbeat answers
    and error frames (``errors.from_connect_error`` turns one into an exception). A new execute frame
    interrupts the turn the previous one started. ``done_writing()`` half-closes the stream.
    """

    def __init__(
        self,
        call: grpc.aio.StreamStreamCall[turn_service_pb2.ConnectRequest, turn_service_pb2.ConnectResponse],
        session_id: str,
    ) -> None:
        self._stream_call = call
        self.session_id = session_id
        super().__init__(lambda: call)

    async def send_execute(
        self,
        *,
        text: str | None = None,
        message: _requests.MessageInput | None = None,
        trigger: turn_service_pb2.Trigger | Mapping[str, Any] | None = None,
        continue_turn: turn_service_pb2.ContinueTurn | Mapping[str, Any] | None = None,
        request_id: str = "",
        multitask_strategy: turn_service_pb2.MultitaskStrategy | str = "MULTITASK_STRATEGY_UNSPECIFIED",
        on_disconnect: turn_service_pb2.DisconnectBehavior | str = "DISCONNECT_BEHAVIOR_UNSPECIFIED",
    ) -> None:
        """Starts a turn; the arguments are those of the client's ``execute``."""
        request = _requests.execute(
            session_id=self.session_id,
            text=text,
            message=message,
            trigger=trigger,
            continue_turn=continue_turn,
            request_id=request_id,
            multitask_strategy=multitask_strategy,
            on_disconnect=on_disconnect,
        )
        await self._write(turn_service_pb2.ConnectRequest(execute=request))

    async def send_stop(self, *, turn_id: str = "") -> None:
        """Stops the running turn (only ``turn_id`` when given)."""
        await self._write(_requests.connect_stop(session_id=self.session_id, turn_id=turn_id))

    async def send_heartbeat(self) -> None:
        """Marks the caller as present; the server answers with the session."""
        await self._write(_requests.connect_heartbeat(self.session_id))

    async def done_writing(self) -> None:
        """Tells the server no more frames follow; responses keep coming until it ends the stream."""
        await self._stream_call.done_writing()

    async def _write(self, request: turn_service_pb2.ConnectRequest) -> None:
        try:
            await self._stream_call.write(request)
        except grpc.RpcError as err:
            raise from_grpc_error(err) from err
        except asyncio.InvalidStateError as err:  # grpc's "RPC already finished" / "RPC is half closed"
            ended = self._stream_call.done()
            raise stream_closed("the call ended" if ended else "done_writing() was called") from err


class Connection(Stream[turn_service_pb2.ConnectResponse]):
    """A Connect stream of the sync client, bound to one session (see :class:`AsyncConnection`)."""

    def __init__(
        self,
        open_call: Callable[
            [Iterator[turn_service_pb2.ConnectRequest]],
            _SyncStreamingCall[turn_service_pb2.ConnectResponse],
        ],
        session_id: str,
    ) -> None:
        # gRPC's sync API reads requests from an iterator on its own thread: frames go through a queue,
        # and None ends the iterator (half-close).
        self._outbox: queue.SimpleQueue[turn_service_pb2.ConnectRequest | None] = queue.SimpleQueue()
        self._stopped: str | None = None  # why the stream takes no more frames, once it does not
        self.session_id = session_id

        def open_connect() -> _SyncStreamingCall[turn_service_pb2.ConnectResponse]:
            call = open_call(iter(self._outbox.get, None))
            # The call can end with that thread still waiting for a frame (the server ended the stream, or
            # it failed): None lets the thread go. add_callback is False for a call that has ended already.
            if not call.add_callback(self._end_requests):
                self._end_requests()
            return call

        super().__init__(open_connect)

    def _end_requests(self) -> None:
        self._stop_taking("the call ended")

    def _stop_taking(self, why: str) -> None:
        if self._stopped is None:
            self._stopped = why
        self._outbox.put(None)

    def _send(self, frame: turn_service_pb2.ConnectRequest) -> None:
        if self._stopped is not None:
            raise stream_closed(self._stopped)
        self._outbox.put(frame)

    def send_execute(
        self,
        *,
        text: str | None = None,
        message: _requests.MessageInput | None = None,
        trigger: turn_service_pb2.Trigger | Mapping[str, Any] | None = None,
        continue_turn: turn_service_pb2.ContinueTurn | Mapping[str, Any] | None = None,
        request_id: str = "",
        multitask_strategy: turn_service_pb2.MultitaskStrategy | str = "MULTITASK_STRATEGY_UNSPECIFIED",
        on_disconnect: turn_service_pb2.DisconnectBehavior | str = "DISCONNECT_BEHAVIOR_UNSPECIFIED",
    ) -> None:
        """Starts a turn; the arguments are those of the client's ``execute``."""
        request = _requests.execute(
            session_id=self.session_id,
            text=text,
            message=message,
            trigger=trigger,
            continue_turn=continue_turn,
            request_id=request_id,
            multitask_strategy=multitask_strategy,
            on_disconnect=on_disconnect,
        )
        self._send(turn_service_pb2.ConnectRequest(execute=request))

    def send_stop(self, *, turn_id: str = "") -> None:
        """Stops the running turn (only ``turn_id`` when given)."""
        self._send(_requests.connect_stop(session_id=self.session_id, turn_id=turn_id))

    def send_heartbeat(self) -> None:
        """Marks the caller as present; the server answers with the session."""
        self._send(_requests.connect_heartbeat(self.session_id))

    def done_writing(self) -> None:
        """Tells the server no more frames follow; responses keep coming until it ends the stream."""
        self._stop_taking("done_writing() was called")

    def cancel(self) -> None:
        """Ends the call; iteration stops quietly."""
        self._stop_taking("cancel() was called")
        super().cancel()
