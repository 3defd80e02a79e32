"""Session events on the wire: the encoder the store calls inside its transactions, and the WatchSession
stream (replay from storage, then live, with no gap and no duplicate at the seam)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from agentsessions.v1 import events_pb2

from ..domain.errors import FieldViolation, OutOfRange, ResourceExhausted, shutting_down
from ..domain.model import Session, StoredMessage
from ..service_layer import SessionsService
from ..store.repository import MessagePageQuery
from . import convert

log = logging.getLogger(__name__)

REPLAY_PAGE = 500


def encode_event(
    kind: str,
    event_id: int,
    time: datetime,
    session: Session,
    detail: Mapping[str, Any],
    messages: Sequence[StoredMessage],
) -> tuple[bytes, events_pb2.SessionEvent]:
    """Builds the SessionEvent of a change: its stored form (without message bodies, which replay reads
    from the history) and its live form."""
    event = events_pb2.SessionEvent(session_id=session.session_id, event_id=event_id)
    convert.set_time(event.time, time)
    if kind != "turn":
        event.session.CopyFrom(convert.session_to_pb(session, time))
        event.session.last_event_id = event_id
    if kind == "messages_appended":
        event.messages_appended.first_sequence = detail["first_sequence"]
        event.messages_appended.last_sequence = detail["last_sequence"]
        stored = event.SerializeToString()
        event.messages_appended.messages.extend(convert.message_to_pb(m, ui_view=False) for m in messages)
        return stored, event
    if kind == "messages_deleted":
        event.messages_deleted.message_ids.extend(detail["message_ids"])
        event.messages_deleted.after_sequence = detail["after_sequence"]
    elif kind == "turn":
        event.turn.CopyFrom(detail["turn"])
    elif kind == "expiring_soon":
        convert.set_time(event.expiring_soon.expire_time, session.expire_time)
    elif kind == "renewed":
        convert.set_time(event.renewed.expire_time, session.expire_time)
        event.renewed.manual = bool(detail.get("manual"))
    elif kind == "timeout_changed":
        event.timeout_changed.effective_timeout_policy.CopyFrom(event.session.effective_timeout_policy)
    elif kind == "updated":
        event.updated.paths.extend(detail["paths"])
    elif kind == "restored":
        event.restored.message_count = detail["message_count"]
    elif kind in ("expired", "ended", "cleared", "deleted"):
        getattr(event, kind).SetInParent()
    else:
        raise ValueError(f"unknown event kind {kind!r}")
    return event.SerializeToString(), event


def lagging(session_id: str, last_event_id: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"the watch of session {session_id!r} fell too far behind; resume from event {last_event_id}",
        reason="WATCH_LAGGING",
        metadata={"session_id": session_id, "last_event_id": str(last_event_id)},
        retry_after_seconds=0,
    )


async def watch(
    service: SessionsService,
    session_id: str,
    after_event_id: int | None,
    *,
    include_deltas: bool,
    buffer: int,
) -> AsyncIterator[events_pb2.SessionEvent]:
    """Stored events after `after_event_id`, then live ones. Subscribing before reading storage closes the
    seam: an event committed meanwhile is in both, and ids drop the second copy; a live event that
    arrives ahead of one still missing sends us back to storage for the gap."""
    with service.bus.subscribe(session_id, max_buffer=buffer, deltas=include_deltas) as live:
        session = await service.store.get_session(session_id)
        if after_event_id is not None and after_event_id > session.last_event_id:
            # Not an id this session issued: skipping every event up to it would drop them all in silence
            # (a session deleted and created again under its id numbers its events from 1 again).
            raise OutOfRange(
                f"session {session_id!r} has issued events up to {session.last_event_id}, not "
                f"{after_event_id}; watch from an id it issued, or from the start",
                reason="EVENT_ID_AHEAD",
                metadata={
                    "session_id": session_id,
                    "after_event_id": str(after_event_id),
                    "last_event_id": str(session.last_event_id),
                },
                violations=[FieldViolation("after_event_id", "is past the session's last event")],
            )
        last = session.last_event_id if after_event_id is None else after_event_id
        finished: set[str] = set()  # turns whose end was sent: their deltas buffered meanwhile are stale
        if after_event_id is not None:
            async for event in _replay(service, session_id, after_event_id):
                last = event.event_id
                _note_finished(event, finished)
                yield event
        while True:
            received = await live.get()
            if received is None:
                if live.ended:
                    raise shutting_down(
                        f"watch session {session_id!r} again from event {last}",
                        session_id=session_id,
                        last_event_id=str(last),
                    )
                raise lagging(session_id, last)
            event = received
            if event.event_id == 0:  # the bus gives deltas only to watches that asked for them
                if event.turn.turn_id not in finished:
                    yield event
                continue
            if event.event_id <= last:
                continue
            if event.event_id > last + 1:
                async for missed in _replay(service, session_id, last, until=event.event_id):
                    last = missed.event_id
                    _note_finished(missed, finished)
                    yield missed
            last = event.event_id
            _note_finished(event, finished)
            yield event
            if event.HasField("deleted"):
                return


def _note_finished(event: events_pb2.SessionEvent, finished: set[str]) -> None:
    """Records the turn `event` finishes, if it does (the few newest: a delta is stale only briefly)."""
    if event.HasField("turn") and event.turn.HasField("turn_finished"):
        if len(finished) >= 64:
            finished.clear()
        finished.add(event.turn.turn_id)


async def load_events(
    service: SessionsService, session_id: str, after: int, upto: int
) -> list[events_pb2.SessionEvent]:
    """Stored events of a session with ids in (after, upto], as watchers get them (message bodies
    included): how a replica delivers events another replica announced without their bodies."""
    return [event async for event in _replay(service, session_id, after, until=upto + 1)]


async def latest_event_id(service: SessionsService, session_id: str) -> int:
    return (await service.store.get_session(session_id)).last_event_id


async def _replay(
    service: SessionsService, session_id: str, after: int, until: int | None = None
) -> AsyncIterator[events_pb2.SessionEvent]:
    while True:
        _, payloads = await service.store.list_events(session_id, after_event_id=after, limit=REPLAY_PAGE)
        for payload in payloads:
            event = events_pb2.SessionEvent.FromString(payload)
            if until is not None and event.event_id >= until:
                return
            if event.HasField("messages_appended"):
                await _fill_messages(service, session_id, event.messages_appended)
            after = event.event_id
            yield event
        if len(payloads) < REPLAY_PAGE:
            return


async def _fill_messages(
    service: SessionsService, session_id: str, appended: events_pb2.MessagesAppended
) -> None:
    first, last = appended.first_sequence, appended.last_sequence
    query = MessagePageQuery(
        descending=False,
        visible_only=False,
        after_sequence=first - 1,
        before_sequence=last + 1,
        limit=last - first + 1,
    )
    rows = await service.store.list_messages(session_id, query)
    appended.messages.extend(convert.message_to_pb(m, ui_view=False) for m in rows)
