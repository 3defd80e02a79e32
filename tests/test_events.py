"""Session events through the published client: every change makes a stored event, WatchSession replays
then follows without gap or duplicate, slow watchers are cut off cleanly, and the sweeper pushes warnings
and expiries (once per window, with nobody touching the session) and purges after the retention period.

Time is the injected clock; the sweeper is driven by the test (`server.sweeper.run_once()`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, timedelta

import pytest
from conftest import DatabaseTarget, make_settings, serving, two_servers

from agentsessions import AsyncSessionsClient, SessionEvent, SessionStatus, errors
from sessiond.domain.clock import ManualClock
from sessiond.server import RunningServer, start_server


def kind(event: SessionEvent) -> str:
    return event.WhichOneof("kind") or ""


async def take(stream: AsyncIterator[SessionEvent], n: int) -> list[SessionEvent]:
    out = []
    async for event in stream:
        out.append(event)
        if len(out) == n:
            break
    return out


async def append(client: AsyncSessionsClient, session_id: str, *texts: str) -> None:
    await client.append_messages(
        session_id=session_id,
        messages=[{"role": "ROLE_USER", "parts": [{"text": {"text": t}}]} for t in texts],
    )


async def test_every_change_is_a_stored_event_in_order(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    sid = f"{unique}/log"
    await client.create_session(agent_id="echo", session_id=sid)
    await append(client, sid, "one", "two")
    await client.heartbeat(session_id=sid)  # the clock did not move: nothing renewed, no event
    await client.update_session(session_id=sid, metadata={"k": "v"})
    await client.update_session(session_id=sid, timeout_policy={"timeoutMinutes": 60})
    clock.advance(minutes=1)
    await client.renew_session(session_id=sid)
    messages = (await client.append_text(session_id=sid, role="user", text="three")).message_id
    await client.delete_messages(session_id=sid, message_id=messages)
    await client.end_session(session_id=sid)

    stream = client.watch_session(session_id=sid, after_event_id=0, resume=False)
    events = await take(stream, 7)
    stream.cancel()
    assert [kind(e) for e in events] == [
        "messages_appended",
        "updated",
        "timeout_changed",
        "renewed",
        "messages_appended",
        "messages_deleted",
        "ended",
    ]
    assert [e.event_id for e in events] == list(range(1, 8))
    first = events[0].messages_appended
    assert (first.first_sequence, first.last_sequence) == (1, 2)
    assert [m.parts[0].text.text for m in first.messages] == ["one", "two"]
    assert events[1].updated.paths == ["metadata"]
    assert events[2].timeout_changed.effective_timeout_policy.timeout_minutes == 60
    assert events[3].renewed.manual
    # The third message was deleted since: a replay carries the messages still held.
    assert events[4].messages_appended.first_sequence == 3
    assert list(events[4].messages_appended.messages) == []
    assert list(events[5].messages_deleted.message_ids) == [messages]
    assert events[6].session.status == SessionStatus.SESSION_STATUS_ENDED
    assert all(e.session.last_event_id == e.event_id for e in events)
    assert (await client.get_session(session_id=sid)).last_event_id == 7


async def test_live_events_follow_the_replay(client: AsyncSessionsClient, unique: str) -> None:
    sid = f"{unique}/live"
    await client.create_session(agent_id="echo", session_id=sid)
    await append(client, sid, "before")
    stream = client.watch_session(session_id=sid, after_event_id=0, resume=False)
    (replayed,) = await take(stream, 1)
    assert replayed.event_id == 1
    await append(client, sid, "after")
    await client.clear_session(session_id=sid)
    live = await take(stream, 2)
    stream.cancel()
    assert [(e.event_id, kind(e)) for e in live] == [(2, "messages_appended"), (3, "cleared")]
    assert live[0].messages_appended.messages[0].parts[0].text.text == "after"


async def test_watch_from_the_sessions_last_event_misses_nothing(
    client: AsyncSessionsClient, unique: str
) -> None:
    sid = f"{unique}/from-here"
    await client.create_session(agent_id="echo", session_id=sid)
    await append(client, sid, "old")
    here = (await client.get_session(session_id=sid)).last_event_id
    await append(client, sid, "raced")  # between the read and the watch: still delivered
    stream = client.watch_session(session_id=sid, after_event_id=here, resume=False)
    (event,) = await take(stream, 1)
    stream.cancel()
    assert event.event_id == here + 1
    assert event.messages_appended.messages[0].parts[0].text.text == "raced"


async def test_a_watch_from_an_id_the_session_never_issued_is_refused(
    client: AsyncSessionsClient, unique: str
) -> None:
    """Resuming past the session's last event would skip every event up to that id in silence: the case of
    a gateway that resumes a session deleted and created again under its id, whose ids start over."""
    sid = f"{unique}/ahead"
    await client.create_session(agent_id="echo", session_id=sid)
    for i in range(3):
        await append(client, sid, f"m{i}")
    stream = client.watch_session(session_id=sid, after_event_id=0, resume=False)
    seen = await take(stream, 3)
    stream.cancel()
    await client.delete_session(session_id=sid, force=True)
    await client.create_session(agent_id="echo", session_id=sid)
    await append(client, sid, "new life")
    with pytest.raises(errors.OutOfRange) as ahead:
        await take(client.watch_session(session_id=sid, after_event_id=seen[-1].event_id, resume=False), 1)
    assert ahead.value.reason == "EVENT_ID_AHEAD"
    assert ahead.value.metadata["last_event_id"] == "1"
    assert ahead.value.field_violations[0][0] == "after_event_id"
    # From the start, or from the session's own last id, the watch works.
    (first,) = await take(client.watch_session(session_id=sid, after_event_id=0, resume=False), 1)
    assert first.event_id == 1 and first.messages_appended.messages[0].parts[0].text.text == "new life"
    stream = client.watch_session(session_id=sid, after_event_id=1, resume=False)
    await append(client, sid, "after")
    (event,) = await take(stream, 1)
    stream.cancel()
    assert event.event_id == 2 and kind(event) == "messages_appended"


async def test_resume_after_a_dropped_watch_has_no_gap_and_no_duplicate(
    client: AsyncSessionsClient, unique: str
) -> None:
    sid = f"{unique}/resume"
    await client.create_session(agent_id="echo", session_id=sid)
    for i in range(5):
        await append(client, sid, f"m{i}")
    stream = client.watch_session(session_id=sid, after_event_id=0, resume=False)
    seen = await take(stream, 2)
    stream.cancel()  # the gateway's connection drops here
    for i in range(5, 8):
        await append(client, sid, f"m{i}")
    resumed = client.watch_session(session_id=sid, after_event_id=seen[-1].event_id, resume=False)
    seen += await take(resumed, 6)
    resumed.cancel()
    assert [e.event_id for e in seen] == list(range(1, 9))
    texts = [e.messages_appended.messages[0].parts[0].text.text for e in seen]
    assert texts == [f"m{i}" for i in range(8)]


async def test_replay_and_live_meet_without_gap_under_concurrent_writes(
    client: AsyncSessionsClient, unique: str
) -> None:
    sid = f"{unique}/seam"
    await client.create_session(agent_id="echo", session_id=sid)
    for i in range(20):
        await append(client, sid, f"early {i}")

    async def writer() -> None:
        for i in range(40):
            await append(client, sid, f"late {i}")

    writing = asyncio.create_task(writer())
    stream = client.watch_session(session_id=sid, after_event_id=0, resume=False)
    events = await take(stream, 60)
    stream.cancel()
    await writing
    assert [e.event_id for e in events] == list(range(1, 61))


async def test_many_watchers_each_get_their_sessions_events(client: AsyncSessionsClient, unique: str) -> None:
    sids = [f"{unique}/fan-{k}" for k in range(3)]
    for sid in sids:
        await client.create_session(agent_id="echo", session_id=sid)
    streams = {
        sid: [client.watch_session(session_id=sid, after_event_id=0, resume=False) for _ in range(8)]
        for sid in sids
    }
    for sid in sids:
        await append(client, sid, f"hello {sid}")
    for sid, watchers in streams.items():
        got = await asyncio.gather(*(take(w, 1) for w in watchers))
        for (event,) in got:
            assert event.session_id == sid
            assert event.messages_appended.messages[0].parts[0].text.text == f"hello {sid}"
        for w in watchers:
            w.cancel()


async def test_deleting_the_session_ends_its_watches(client: AsyncSessionsClient, unique: str) -> None:
    sid = f"{unique}/gone"
    await client.create_session(agent_id="echo", session_id=sid)
    await append(client, sid, "x")
    stream = client.watch_session(session_id=sid, after_event_id=0, resume=False)
    assert (await take(stream, 1))[0].event_id == 1
    await client.delete_session(session_id=sid, force=True)
    rest = [e async for e in stream]  # ends by itself
    assert [kind(e) for e in rest] == ["deleted"]
    assert rest[0].event_id == 2
    with pytest.raises(errors.NotFound):
        await take(client.watch_session(session_id=sid, after_event_id=0, resume=False), 1)


async def test_watch_rejects_bad_input(client: AsyncSessionsClient, unique: str) -> None:
    with pytest.raises(errors.NotFound) as missing:
        await take(client.watch_session(session_id=f"{unique}/nope", resume=False), 1)
    assert missing.value.reason == "SESSION_NOT_FOUND"
    await client.create_session(agent_id="echo", session_id=f"{unique}/w")
    with pytest.raises(errors.InvalidArgument) as negative:
        await take(client.watch_session(session_id=f"{unique}/w", after_event_id=-1, resume=False), 1)
    assert negative.value.field_violations[0][0] == "after_event_id"


@pytest.fixture
async def small_buffer_server(database: DatabaseTarget, clock: ManualClock) -> AsyncIterator[RunningServer]:
    async with serving(make_settings(database, watch_buffer=4), clock) as running:
        yield running


async def test_a_slow_watcher_is_cut_off_and_resumes_without_loss(
    small_buffer_server: RunningServer, unique: str
) -> None:
    sid = f"{unique}/slow"
    big = "x" * 60_000  # enough events to fill the transport's windows while nobody reads
    # A fixed 64 KiB flow-control window (no BDP probing), so a reader that stops reading holds the
    # server back after a few events instead of after megabytes.
    window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65536)]
    target = f"127.0.0.1:{small_buffer_server.port}"
    async with AsyncSessionsClient(target, channel_options=window) as client:
        await client.create_session(agent_id="echo", session_id=sid)
        await append(client, sid, "first")
        slow = client.watch_session(session_id=sid, after_event_id=0, resume=False)
        (first,) = await take(slow, 1)  # the watch is live from here on
        for i in range(40):
            await append(client, sid, f"{i}:{big}")
        seen = [first.event_id]
        with pytest.raises(errors.ResourceExhausted) as cut:
            async for event in slow:
                seen.append(event.event_id)
        assert cut.value.reason == "WATCH_LAGGING"
        assert int(cut.value.metadata["last_event_id"]) == seen[-1]
        assert seen == list(range(1, len(seen) + 1))
        # Resuming from the last id seen delivers the rest exactly once.
        resumed = client.watch_session(session_id=sid, after_event_id=seen[-1], resume=False)
        seen += [e.event_id for e in await take(resumed, 41 - len(seen))]
        resumed.cancel()
        assert seen == list(range(1, 42))
        # The client's own resumption does the same without the caller noticing.
        auto = client.watch_session(session_id=sid, after_event_id=0)
        assert [e.event_id for e in await take(auto, 41)] == list(range(1, 42))
        auto.cancel()


async def test_a_connect_stream_that_stops_reading_is_cut_off_from_session_events(
    small_buffer_server: RunningServer, unique: str
) -> None:
    """Connect relays the session's events too; a caller that stops reading them is cut off with a
    WATCH_LAGGING error frame, as a watcher is, and then gets live events again. Before, the stream
    queued every event for as long as it stayed open (the server's memory grew with each append) and the
    cut-off never came."""
    sid = f"{unique}/slow-connect"
    big = "x" * 60_000
    window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65536)]
    async with AsyncSessionsClient(f"127.0.0.1:{small_buffer_server.port}", channel_options=window) as client:
        await client.create_session(agent_id="echo", session_id=sid)
        conn = client.connect(session_id=sid)
        frames = conn.__aiter__()
        await conn.send_heartbeat()  # the stream follows the session from its first frame
        assert (await frames.__anext__()).HasField("session")
        for i in range(40):
            await append(client, sid, f"{i}:{big}")
        seen: list[int] = []
        while not (frame := await asyncio.wait_for(frames.__anext__(), 30)).HasField("error"):
            seen.append(frame.session_event.event_id)
        lagging = errors.from_connect_error(frame.error)
        assert isinstance(lagging, errors.ResourceExhausted) and lagging.reason == "WATCH_LAGGING"
        assert seen == list(range(seen[0], seen[0] + len(seen))) and len(seen) < 40  # the rest was dropped
        # The stream goes on, with live events and answers to its frames.
        await append(client, sid, "later")
        await conn.send_heartbeat()
        two = [await asyncio.wait_for(frames.__anext__(), 30) for _ in range(2)]
        rest = {f.WhichOneof("frame"): f for f in two}  # in either order
        assert rest["session_event"].session_event.messages_appended.messages[0].parts[0].text.text == "later"
        assert rest["session"].session.session_id == sid
        await conn.done_writing()


# --- the sweeper --------------------------------------------------------------------------------------


def minutes(n: float) -> timedelta:
    return timedelta(minutes=n)


async def stored_kinds(client: AsyncSessionsClient, sid: str) -> list[str]:
    last = (await client.get_session(session_id=sid)).last_event_id
    if last == 0:
        return []
    stream = client.watch_session(session_id=sid, after_event_id=0, resume=False)
    events = await take(stream, last)
    stream.cancel()
    return [kind(e) for e in events]


async def test_warning_once_per_window_and_again_after_renewal(
    client: AsyncSessionsClient, server: RunningServer, clock: ManualClock, unique: str
) -> None:
    sid = f"{unique}/warn"
    created = await client.create_session(agent_id="echo", session_id=sid)  # 30 min, warning at 5 left
    watcher = client.watch_session(session_id=sid, after_event_id=0, resume=False)

    clock.advance(minutes=25)  # exactly 5 left: not yet under the threshold
    await server.sweeper.run_once()
    assert await stored_kinds(client, sid) == []
    clock.advance(seconds=1)
    await server.sweeper.run_once()
    await server.sweeper.run_once()  # a second pass in the same window pushes nothing more
    assert await stored_kinds(client, sid) == ["expiring_soon"]
    (warning,) = await take(watcher, 1)
    assert warning.expiring_soon.expire_time == created.expire_time
    assert warning.session.near_expiration

    await client.heartbeat(session_id=sid)  # a new window
    clock.advance(minutes=26)
    await server.sweeper.run_once()
    await server.sweeper.run_once()
    assert await stored_kinds(client, sid) == ["expiring_soon", "renewed", "expiring_soon"]
    live = await take(watcher, 2)
    watcher.cancel()
    assert [kind(e) for e in live] == ["renewed", "expiring_soon"]


async def test_expiry_is_pushed_without_anyone_touching_the_session(
    client: AsyncSessionsClient, server: RunningServer, clock: ManualClock, unique: str
) -> None:
    sid = f"{unique}/expire"
    await client.create_session(agent_id="echo", session_id=sid)
    watcher = client.watch_session(session_id=sid, after_event_id=0, resume=False)
    clock.advance(minutes=31)  # straight past the warning: the expiry alone is pushed
    result = await server.sweeper.run_once()
    assert result.notified >= 1
    (expired,) = await take(watcher, 1)
    watcher.cancel()
    assert kind(expired) == "expired"
    assert expired.session.status == SessionStatus.SESSION_STATUS_EXPIRED
    await server.sweeper.run_once()
    assert await stored_kinds(client, sid) == ["expired"]


async def test_expiry_is_pushed_at_the_instant_the_session_expires(
    client: AsyncSessionsClient, server: RunningServer, clock: ManualClock, unique: str
) -> None:
    """A session is expired from its expire_time on (GetSession says so), and a sweep at that instant
    pushes `expired`, warned before or not. Before, a warned session's expiry came one sweep later: the
    sweep looked for notices due strictly before now."""
    sid = f"{unique}/edge"
    created = await client.create_session(agent_id="echo", session_id=sid)
    clock.advance(minutes=26)
    await server.sweeper.run_once()
    assert await stored_kinds(client, sid) == ["expiring_soon"]
    clock.set(created.expire_time.ToDatetime(tzinfo=UTC))
    assert (await client.get_session(session_id=sid)).status == SessionStatus.SESSION_STATUS_EXPIRED
    await server.sweeper.run_once()
    assert await stored_kinds(client, sid) == ["expiring_soon", "expired"]


async def test_ended_sessions_get_no_expiry_notices(
    client: AsyncSessionsClient, server: RunningServer, clock: ManualClock, unique: str
) -> None:
    sid = f"{unique}/ended"
    await client.create_session(agent_id="echo", session_id=sid)
    await client.end_session(session_id=sid)
    clock.advance(minutes=40)
    await server.sweeper.run_once()
    assert await stored_kinds(client, sid) == ["ended"]


async def test_retention_purges_expired_and_ended_sessions(
    database: DatabaseTarget, clock: ManualClock, unique: str
) -> None:
    running = await start_server(make_settings(database, retention_minutes=60), clock=clock)
    try:
        async with AsyncSessionsClient(f"127.0.0.1:{running.port}") as client:
            expired, ended, active = f"{unique}/p-exp", f"{unique}/p-end", f"{unique}/p-act"
            for sid in (expired, ended):
                await client.create_session(agent_id="echo", session_id=sid)
                await append(client, sid, "kept until the retention ends")
            await client.end_session(session_id=ended)
            clock.advance(minutes=31)  # `expired` expires now; `ended` ended 31 minutes ago
            await client.create_session(
                agent_id="echo", session_id=active, timeout_policy={"timeoutMinutes": 120}
            )
            await running.sweeper.run_once()
            for sid in (expired, ended):  # inside the retention period: readable
                assert (await client.get_session(session_id=sid)).message_count == 1
            # Watchers from the last event on: the purge is the next thing that happens to them. Each
            # replays that last event first, so the watch is known to be open before the purge runs.
            watchers = {}
            for sid in (expired, ended):
                last = (await client.get_session(session_id=sid)).last_event_id
                watch = client.watch_session(session_id=sid, after_event_id=last - 1, resume=False)
                assert (await anext(watch)).event_id == last
                watchers[sid] = watch
            clock.advance(minutes=61)
            await running.sweeper.run_once()
            for sid in (expired, ended):
                with pytest.raises(errors.NotFound):
                    await client.get_session(session_id=sid)
                # Told, as for DeleteSession, and the watch ends there instead of waiting forever.
                (gone,) = [e async for e in watchers[sid]]
                assert kind(gone) == "deleted" and gone.session.session_id == sid
            assert (await client.get_session(session_id=active)).status == SessionStatus.SESSION_STATUS_ACTIVE
    finally:
        await running.stop(0)


async def test_retention_zero_keeps_sessions(
    database: DatabaseTarget, clock: ManualClock, unique: str
) -> None:
    running = await start_server(make_settings(database, retention_minutes=0), clock=clock)
    try:
        async with AsyncSessionsClient(f"127.0.0.1:{running.port}") as client:
            sid = f"{unique}/forever"
            await client.create_session(agent_id="echo", session_id=sid)
            clock.advance(days=400)
            await running.sweeper.run_once()
            assert (await client.get_session(session_id=sid)).status == SessionStatus.SESSION_STATUS_EXPIRED
    finally:
        await running.stop(0)


async def test_two_sweepers_on_one_database_push_each_event_once(
    database: DatabaseTarget, clock: ManualClock, unique: str
) -> None:
    settings = make_settings(database, retention_minutes=0)
    async with (
        two_servers(settings, clock) as (first, second),
        AsyncSessionsClient(f"127.0.0.1:{first.port}") as client,
    ):
        sids = [f"{unique}/two-{k}" for k in range(120)]
        for sid in sids:
            await client.create_session(agent_id="echo", session_id=sid)
        clock.advance(minutes=26)
        first.sweeper.batch_size = second.sweeper.batch_size = 7  # many small, interleaved batches
        await asyncio.gather(first.sweeper.run_once(), second.sweeper.run_once())
        clock.advance(minutes=5)
        await asyncio.gather(first.sweeper.run_once(), second.sweeper.run_once(), first.sweeper.run_once())
        for sid in sids:
            assert await stored_kinds(client, sid) == ["expiring_soon", "expired"]


async def test_stats_report_sessions_by_status(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    before = await client.get_server_stats()
    await client.create_session(agent_id="echo", session_id=f"{unique}/s1")
    after = await client.get_server_stats()
    assert after.active_sessions == before.active_sessions + 1
    assert after.version


async def test_a_stuck_watcher_holds_back_no_one(
    client: AsyncSessionsClient, target: str, unique: str
) -> None:
    sid = f"{unique}/stuck"
    await client.create_session(agent_id="echo", session_id=sid)
    window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65536)]
    async with AsyncSessionsClient(target, channel_options=window) as stuck_client:
        stuck = stuck_client.watch_session(session_id=sid, after_event_id=0, resume=False)
        await append(client, sid, "first")
        assert (await take(stuck, 1))[0].event_id == 1  # then it stops reading
        other = client.watch_session(session_id=sid, after_event_id=1, resume=False)
        reading = asyncio.create_task(take(other, 30))
        big = "y" * 60_000
        for i in range(30):
            await append(client, sid, f"{i}:{big}")
        assert [e.event_id for e in await reading] == list(range(2, 32))
        other.cancel()
        stuck.cancel()
