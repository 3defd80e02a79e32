"""Append batching: appends a client's callers make while others are under way leave together.

One gRPC call costs a Python client and server several times what storing a message costs, and callers
writing to many sessions at once (an agent worker serving several conversations) each pay it. So
:class:`AppendBatcher` sends an append at once while fewer than ``max_in_flight`` appends are under
way, and otherwise holds it until one of them is answered; the appends held meanwhile then leave in one
``BatchAppendMessages`` call (up to ``max_entries`` of them, and ``max_bytes``), one turn of the event
loop after that answer, so that the callers it answered join with their next appends. An append made
while none is under way (and none is about to leave) never waits; one held waits about as long as the
call under way takes.

Only appends whose messages all carry ids are batched (the client's other appends go one by one): a
batch whose answer is too large for the channel (RESOURCE_EXHAUSTED: each entry's answer holds its
session) may have landed, and is sent again entry by entry, which the ids make safe.

Each append keeps its own outcome: the server applies the entries of a batch as separate calls, and a
failed entry raises in its caller only, the exception its own call would have raised. A call that fails
as a whole (the server unreachable, say) raises in every caller of the batch, and each caller's retry
policy then decides for its own append, as it would have for a call of its own. Each caller keeps its
deadline too: the batch's is the latest of theirs, and a caller whose deadline passes first stops
waiting with ``DeadlineExceeded`` (its append may still land, as a call that timed out may have). A
batch is sent in a context of its own (contextvars: a trace, say), since it belongs to several callers;
an append sent on its own is sent in its caller's.

A server without ``BatchAppendMessages`` (UNIMPLEMENTED) is remembered, and appends go one by one.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc

from agentsessions.errors import (
    AgentSessionsError,
    client_closed,
    exception_for,
    from_connect_error,
    from_grpc_error,
)
from agentsessions.v1 import message_service_pb2

Request = message_service_pb2.AppendMessagesRequest
Response = message_service_pb2.AppendMessagesResponse
Single = Callable[[Request, float | None], Awaitable[Response]]
Batch = Callable[
    [message_service_pb2.BatchAppendMessagesRequest, float | None],
    Awaitable[message_service_pb2.BatchAppendMessagesResponse],
]


@dataclass(frozen=True)
class AppendBatching:
    """How :class:`agentsessions.AsyncSessionsClient` batches appends (see ``agentsessions._batching``).

    Args:
        max_in_flight: appends (or batches) under way before the next append waits to join a batch.
        max_entries: appends per batch at most (the server takes up to 100).
        max_bytes: serialized bytes of the appends of a batch at most (one append larger goes alone).
    """

    max_in_flight: int = 1
    max_entries: int = 64
    max_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_in_flight < 1 or self.max_entries < 1 or self.max_bytes < 1:
            raise ValueError("max_in_flight, max_entries and max_bytes must be at least 1")


@dataclass(eq=False)
class _Held:
    request: Request
    deadline: float | None  # loop time; None: no deadline
    size: int
    context: contextvars.Context  # the caller's: where its append is sent when it goes on its own
    future: asyncio.Future[Response] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class AppendBatcher:
    """Sends appends one by one while few are under way, and in batches while many are."""

    def __init__(self, single: Single, batch: Batch, options: AppendBatching) -> None:
        self._single = single
        self._batch = batch
        self._options = options
        self._held: list[_Held] = []
        self._in_flight = 0
        self._supported = True
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._flush_due = False  # held appends leave at the next turn of the loop (`_later`)

    def close(self) -> None:
        """The client closed: appends held and appends to come raise ``CLIENT_CLOSED``."""
        self._closed = True
        held, self._held = self._held, []
        for h in held:
            _settle(h, None, client_closed())

    async def append(self, request: Request, time_left: float | None) -> Response:
        """One attempt of an append whose messages all carry ids (a batch whose answer is lost is sent
        again entry by entry, which only such appends make safe): raises ``grpc.RpcError`` or
        :class:`AgentSessionsError` when it fails."""
        if self._closed:
            raise client_closed()
        if not self._supported or (
            self._in_flight < self._options.max_in_flight and not self._held and not self._flush_due
        ):
            self._in_flight += 1
            try:
                return await self._single(request, time_left)
            finally:
                self._in_flight -= 1
                self._later(answered=1)
        loop = asyncio.get_running_loop()
        deadline = None if time_left is None else loop.time() + time_left
        held = _Held(request, deadline, request.ByteSize(), contextvars.copy_context())
        self._held.append(held)
        # The future itself is awaited, with a timer for the deadline: `asyncio.wait` took an extra turn
        # of the loop to wake the caller, by when the next batch had left without its next append; and
        # on Python 3.11 `wait_for` returns the result, not the cancellation, of a future that completes
        # in the same loop iteration as the cancel.
        timer = None if time_left is None else loop.call_later(time_left, self._expire, held)
        try:
            return await held.future
        finally:
            if timer is not None:
                timer.cancel()
            if held in self._held:  # the caller gave up before its append left: it leaves the batch
                self._held.remove(held)
            elif held.future.done() and not held.future.cancelled():
                held.future.exception()  # seen, even when a cancel that came with it ended the wait

    def _expire(self, held: _Held) -> None:
        """A held caller's deadline passed: it stops waiting (its append may still land, if it left)."""
        if held in self._held:
            self._held.remove(held)
        _settle(held, None, exception_for(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))

    def _later(self, answered: int) -> None:
        """A call that answered `answered` callers ended: the held appends leave at the next turn of the
        loop rather than now, so that the callers it answered, which run first, join them with their next
        appends (otherwise the first of them would leave alone and the others wait for it). With nothing
        held and one caller answered there is nothing to gather: that caller's next append goes at once,
        from its own task, so that cancelling it cancels its call."""
        if self._flush_due or (answered <= 1 and not self._held):
            return
        self._flush_due = True
        asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        self._send_held()

    def _send_held(self) -> None:
        while self._held and self._in_flight < self._options.max_in_flight:
            batch = self._take()
            self._in_flight += 1
            # In a context of its own: not that of the caller whose answer let it go (its trace, say).
            task = asyncio.get_running_loop().create_task(self._send(batch), context=contextvars.Context())
            self._tasks.add(task)  # held here until done: the loop keeps only weak references to tasks
            task.add_done_callback(self._tasks.discard)

    async def _one_by_one(self, batch: Sequence[_Held]) -> None:
        """Each append of `batch` in a call of its own, sent in its caller's context."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.create_task(self._send_one(held), context=held.context) for held in batch)
        )

    def _take(self) -> list[_Held]:
        options = self._options
        taken = [self._held[0]]
        size = taken[0].size
        for held in self._held[1:]:
            if len(taken) == options.max_entries or size + held.size > options.max_bytes:
                break
            taken.append(held)
            size += held.size
        del self._held[: len(taken)]
        return taken

    async def _send(self, batch: Sequence[_Held]) -> None:
        try:
            if len(batch) == 1 or not self._supported:
                await self._one_by_one(batch)
            else:
                await self._send_batch(batch)
        except BaseException as exc:
            # Not a call's failure: the channel closed under the batch (which cancels it), or was closed
            # by its owner (UsageError). Every caller still waiting learns it, rather than waiting forever.
            failure = client_closed() if isinstance(exc, asyncio.CancelledError) else exc
            for held in batch:
                _settle(held, None, failure)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._in_flight -= 1
            self._later(answered=len(batch))

    async def _send_one(self, held: _Held) -> None:
        try:
            _settle(held, await self._single(held.request, _left(held.deadline)), None)
        except (grpc.RpcError, AgentSessionsError) as exc:
            _settle(held, None, exc)

    async def _send_batch(self, batch: Sequence[_Held]) -> None:
        deadlines = [held.deadline for held in batch]
        latest = None if None in deadlines else max(d for d in deadlines if d is not None)
        request = message_service_pb2.BatchAppendMessagesRequest(requests=[held.request for held in batch])
        try:
            response = await self._batch(request, _left(latest))
        except grpc.RpcError as err:
            code = from_grpc_error(err).code
            # UNIMPLEMENTED: an older server, one by one from now on. RESOURCE_EXHAUSTED: an answer larger
            # than the channel takes (each entry's holds its session); the entries may have landed, so
            # each goes again alone, which their message ids make safe.
            if code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED):
                if code is grpc.StatusCode.UNIMPLEMENTED:
                    self._supported = False
                await self._one_by_one(batch)
                return
            for held in batch:
                _settle(held, None, err)
            return
        for held, outcome in zip(batch, response.outcomes, strict=False):
            if outcome.HasField("response"):
                _settle(held, outcome.response, None)
            elif outcome.HasField("error"):
                _settle(held, None, from_connect_error(outcome.error))
            else:
                _settle(
                    held, None, exception_for(grpc.StatusCode.INTERNAL, "the server sent an empty outcome")
                )
        for held in batch[len(response.outcomes) :]:
            _settle(held, None, exception_for(grpc.StatusCode.INTERNAL, "the server left this append out"))


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())


def _settle(held: _Held, response: Response | None, error: BaseException | None) -> None:
    if held.future.done():
        return
    if error is not None:
        held.future.set_exception(error)
    else:
        assert response is not None
        held.future.set_result(response)
