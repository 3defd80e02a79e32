"""The event bus: how a session's events reach the watchers and streams that follow it live.

`EventBus` is the interface the rest of the server uses; `InProcessEventBus` is the default, for one
process. A bus that fans out between replicas (PostgreSQL LISTEN/NOTIFY) implements the same interface and
slots in at assembly (`sessiond.server`) without touching publishers or subscribers.

Events are `agentsessions.v1.SessionEvent` messages. Durable events (event_id > 0) are published after the
transaction that stored them commits; live-only events (event_id == 0, e.g. turn deltas) are published as
they happen. Publishing never blocks: each subscription has a bounded buffer, and a subscriber that falls
that far behind is cut off (`Subscription.lagging`) and must resume from the last event id it saw.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

from agentsessions.v1 import events_pb2

DEFAULT_BUFFER = 1024

# How a bus reads a session's stored events in (after, upto], and its latest event id.
Loader = Callable[[str, int, int], Awaitable[list[events_pb2.SessionEvent]]]
Latest = Callable[[str], Awaitable[int]]
# Turn events that only subscribers asking for deltas get: by far the most frequent events of a turn.
DELTA_KINDS = frozenset({"text_delta", "reasoning_delta"})


def is_delta(event: events_pb2.SessionEvent) -> bool:
    return event.event_id == 0 and event.turn.WhichOneof("kind") in DELTA_KINDS


class Subscription:
    """Live events of one session for one subscriber, in publish order."""

    def __init__(self, bus: InProcessEventBus, session_id: str, max_buffer: int, deltas: bool) -> None:
        self.session_id = session_id
        self.deltas = deltas
        self.lagging = False
        self.ended = False  # the server is shutting down (`InProcessEventBus.end_subscriptions`)
        self._bus = bus
        self._queue: asyncio.Queue[events_pb2.SessionEvent | None] = asyncio.Queue(max_buffer)

    def _offer(self, event: events_pb2.SessionEvent) -> None:
        if self.lagging or self.ended:
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            # Cut off instead of growing without bound or stalling the publisher; the wake-up token
            # goes in place of the oldest event so the subscriber notices at once.
            self.lagging = True
            self._cut_off()

    def _cut_off(self) -> None:
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    def end(self) -> None:
        """No more events: the server is shutting down. The subscriber gets None (after the events
        already buffered) and, seeing `ended`, tells its caller to go on elsewhere."""
        if not self.ended and not self.lagging:
            self.ended = True
            self._cut_off()

    async def get(self) -> events_pb2.SessionEvent | None:
        """The next event; None once the subscription is lagging (the caller must resume from storage)
        or, after the events buffered before, once it ended."""
        if self.lagging and self._queue.empty():
            return None
        event = await self._queue.get()
        return None if self.lagging else event

    def get_nowait(self) -> events_pb2.SessionEvent | None:
        """The next buffered event, or None when none is buffered."""
        try:
            event = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
        return None if self.lagging else event

    def close(self) -> None:
        self._bus._remove(self)

    async def __aiter__(self) -> AsyncIterator[events_pb2.SessionEvent]:
        while (event := await self.get()) is not None:
            yield event

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus(Protocol):
    def publish(self, event: events_pb2.SessionEvent) -> None:
        """Delivers `event` to every current subscriber of `event.session_id`. Never blocks."""
        ...

    def subscribe(
        self, session_id: str, *, max_buffer: int = DEFAULT_BUFFER, deltas: bool = False
    ) -> Subscription:
        """Starts buffering the session's live events for one subscriber (close it when done). Turn
        deltas only reach subscribers that ask for them (`deltas`)."""
        ...

    def subscriber_count(self) -> int: ...

    def end_subscriptions(self) -> None:
        """Ends every subscription, and those made from now on, for a shutdown (`Subscription.end`)."""
        ...

    def signal(self, name: str, data: Mapping[str, Any]) -> None:
        """Tells the other replicas something (a stop asked for a turn one of them runs); never blocks,
        may be lost. Within one process there is nobody else to tell."""
        ...

    def on_signal(self, name: str, handler: Callable[[Mapping[str, Any]], None]) -> None:
        """Calls `handler` with the data of each `name` signal another replica sends."""
        ...


class InProcessEventBus:
    """Fan-out inside one process: a set of bounded subscriptions per session."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[Subscription]] = {}
        self._handlers: dict[str, list[Callable[[Mapping[str, Any]], None]]] = {}
        self._ending = False

    async def start(self, load: Loader, latest: Latest) -> None:
        """Starts what the bus runs besides fan-out, given how to read a session's stored events (as
        watchers get them) and its latest event id. One process: nothing to start, nothing to read."""

    async def close(self) -> None:
        """Stops what `start` started."""

    def signal(self, name: str, data: Mapping[str, Any]) -> None:
        """One process: no other replica to tell."""

    def on_signal(self, name: str, handler: Callable[[Mapping[str, Any]], None]) -> None:
        self._handlers.setdefault(name, []).append(handler)

    def publish(self, event: events_pb2.SessionEvent) -> None:
        subscribers = self._subscribers.get(event.session_id)
        if not subscribers:
            return
        delta = is_delta(event)
        for subscription in tuple(subscribers):
            if subscription.deltas or not delta:
                subscription._offer(event)

    def subscribe(
        self, session_id: str, *, max_buffer: int = DEFAULT_BUFFER, deltas: bool = False
    ) -> Subscription:
        subscription = Subscription(self, session_id, max_buffer, deltas)
        self._subscribers.setdefault(session_id, set()).add(subscription)
        if self._ending:
            subscription.end()
        return subscription

    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subscribers.values())

    def end_subscriptions(self) -> None:
        self._ending = True
        for subscribers in self._subscribers.values():
            for subscription in subscribers:
                subscription.end()

    def _remove(self, subscription: Subscription) -> None:
        subscribers = self._subscribers.get(subscription.session_id)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscribers[subscription.session_id]
