"""Timeouts through the published client, at their edges: expiry, the warning flag, renewal on activity,
manual renewal, the hard cap, the three tiers of the policy, and range checks.

Expiry is a function of the clock and the stored times: no sweeper runs here, the tests only move the
injected clock, and every status read is computed at the moment of the call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from assertions import raises, ts
from conftest import DatabaseTarget, make_settings

from agentsessions import (
    Agent,
    AsyncSessionsClient,
    EchoBackend,
    PolicySource,
    Session,
    SessionStatus,
    TimeoutPolicy,
    errors,
)
from sessiond.config import StartupError
from sessiond.domain.clock import ManualClock
from sessiond.server import RunningServer, start_server

ACTIVE = SessionStatus.SESSION_STATUS_ACTIVE
EXPIRED = SessionStatus.SESSION_STATUS_EXPIRED
SESSION = PolicySource.POLICY_SOURCE_SESSION
AGENT = PolicySource.POLICY_SOURCE_AGENT
GLOBAL = PolicySource.POLICY_SOURCE_GLOBAL
US = timedelta(microseconds=1)


def minutes(n: float) -> timedelta:
    return timedelta(minutes=n)


def effective(session: Session) -> tuple[int, bool, int, int]:
    e = session.effective_timeout_policy
    return (e.timeout_minutes, e.auto_renew, e.max_duration_minutes, e.warning_threshold_minutes)


def sources(session: Session) -> tuple[int, int, int, int]:
    e = session.effective_timeout_policy
    return (
        e.timeout_minutes_source,
        e.auto_renew_source,
        e.max_duration_minutes_source,
        e.warning_threshold_minutes_source,
    )


StartServer = Callable[..., Awaitable[AsyncSessionsClient]]


@pytest.fixture
async def start(database: DatabaseTarget, clock: ManualClock) -> AsyncIterator[StartServer]:
    """Starts servers with other settings (the SESSION_*_MINUTES defaults) on the same database and clock."""
    started: list[tuple[RunningServer, AsyncSessionsClient]] = []

    async def start_with(**overrides: object) -> AsyncSessionsClient:
        running = await start_server(make_settings(database, **overrides), clock=clock)
        client = AsyncSessionsClient(f"127.0.0.1:{running.port}")
        started.append((running, client))
        return client

    yield start_with
    for running, client in reversed(started):
        await client.close()
        await running.stop(0)


# --- defaults and the expiry edge ---------------------------------------------------------------------------


async def test_global_defaults(client: AsyncSessionsClient, clock: ManualClock, unique: str) -> None:
    created = await client.create_session(agent_id="echo", session_id=f"{unique}/defaults")
    now = clock.now()

    assert effective(created) == (30, True, 720, 5)
    assert sources(created) == (GLOBAL, GLOBAL, GLOBAL, GLOBAL)
    assert not created.timeout_policy.ListFields()  # nothing set on the session tier
    assert ts(created.create_time) == now
    assert ts(created.expire_time) == now + minutes(30)
    assert ts(created.max_expire_time) == now + minutes(720)
    assert created.time_remaining.ToTimedelta() == minutes(30)


async def test_expires_exactly_at_expire_time(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    session_id = f"{unique}/edge"
    created = await client.create_session(agent_id="echo", session_id=session_id)
    expire_time = ts(created.create_time) + minutes(30)
    assert ts(created.expire_time) == expire_time

    clock.set(expire_time - US)
    last_moment = await client.get_session(session_id=session_id)
    assert last_moment.status == ACTIVE
    assert last_moment.time_remaining.ToTimedelta() == US
    assert last_moment.near_expiration

    clock.set(expire_time)
    expired = await client.get_session(session_id=session_id)
    assert expired.status == EXPIRED
    assert expired.time_remaining.ToTimedelta() == timedelta(0)
    assert not expired.near_expiration
    assert expired.expire_time == created.expire_time
    # Nothing was written to make it expire: the stored session is unchanged.
    assert expired.etag == created.etag


async def test_activity_in_the_last_microsecond_renews(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    session_id = f"{unique}/last-us"
    created = await client.create_session(agent_id="echo", session_id=session_id)
    clock.set(ts(created.expire_time) - US)

    renewed = await client.heartbeat(session_id=session_id)
    assert renewed.status == ACTIVE
    assert ts(renewed.expire_time) == clock.now() + minutes(30)

    clock.set(ts(created.expire_time))
    assert (await client.get_session(session_id=session_id)).status == ACTIVE


async def test_expired_status_is_computed_without_a_sweeper(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    session_id = f"{unique}/no-sweeper"
    await client.create_session(agent_id="echo", session_id=session_id, metadata={"suite": unique})

    async def listed(status: str) -> list[str]:
        return [
            s.session_id async for s in await client.list_sessions(metadata={"suite": unique}, status=status)
        ]

    assert (await listed("active"), await listed("expired")) == ([session_id], [])
    clock.advance(minutes=30)
    assert (await listed("active"), await listed("expired")) == ([], [session_id])
    # Moving the clock back makes it active again: status is a function of the clock, not a stored flag.
    clock.advance(minutes=-1)
    assert (await client.get_session(session_id=session_id)).status == ACTIVE


# --- near expiration ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("warning", [None, 1, 10, 29])
async def test_near_expiration_flips_under_the_warning_threshold(
    client: AsyncSessionsClient, clock: ManualClock, unique: str, warning: int | None
) -> None:
    session_id = f"{unique}/warn"
    policy = TimeoutPolicy(warning_threshold_minutes=warning) if warning is not None else None
    created = await client.create_session(agent_id="echo", session_id=session_id, timeout_policy=policy)
    threshold = minutes(warning if warning is not None else 5)
    assert created.effective_timeout_policy.warning_threshold_minutes == threshold // minutes(1)
    warn_at = ts(created.expire_time) - threshold

    assert not created.near_expiration
    clock.set(warn_at)  # exactly the threshold left: not yet under it
    at_threshold = await client.get_session(session_id=session_id)
    assert at_threshold.status == ACTIVE and not at_threshold.near_expiration
    assert at_threshold.time_remaining.ToTimedelta() == threshold

    clock.set(warn_at + US)
    under = await client.get_session(session_id=session_id)
    assert under.status == ACTIVE and under.near_expiration

    # Activity moves the expiry away, and the flag clears.
    renewed = await client.heartbeat(session_id=session_id)
    assert not renewed.near_expiration


async def test_warning_threshold_at_least_the_timeout_flags_from_the_start(
    client: AsyncSessionsClient, unique: str
) -> None:
    created = await client.create_session(
        agent_id="echo",
        session_id=f"{unique}/warn-all",
        timeout_policy=TimeoutPolicy(timeout_minutes=10, warning_threshold_minutes=15),
    )
    assert created.status == ACTIVE and created.near_expiration


# --- renewal on activity ------------------------------------------------------------------------------------

Activity = Callable[[AsyncSessionsClient, str], Awaitable[Session]]


async def _heartbeat(client: AsyncSessionsClient, session_id: str) -> Session:
    return await client.heartbeat(session_id=session_id)


async def _append(client: AsyncSessionsClient, session_id: str) -> Session:
    response = await client.append_messages(
        session_id=session_id, messages=[{"role": "ROLE_USER", "parts": [{"text": {"text": "hi"}}]}]
    )
    return response.session


ACTIVITIES: dict[str, Activity] = {"heartbeat": _heartbeat, "append": _append}


@pytest.mark.parametrize("activity", list(ACTIVITIES))
async def test_activity_renews_with_auto_renew(
    client: AsyncSessionsClient, clock: ManualClock, unique: str, activity: str
) -> None:
    session_id = f"{unique}/auto"
    created = await client.create_session(agent_id="echo", session_id=session_id)

    for count in (1, 2, 3):
        clock.advance(minutes=25)
        session = await ACTIVITIES[activity](client, session_id)
        assert session.status == ACTIVE
        assert ts(session.expire_time) == clock.now() + minutes(30)
        assert ts(session.last_activity_time) == clock.now()
        assert session.renewal_count == count
    # 75 minutes after creation, well past the first 30-minute expiry.
    assert ts(session.expire_time) - ts(created.create_time) == minutes(105)
    assert await client.get_session(session_id=session_id) == session


async def test_activity_that_moves_nothing_is_not_a_renewal(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    session_id = f"{unique}/same-instant"
    created = await client.create_session(agent_id="echo", session_id=session_id)
    beat = await client.heartbeat(session_id=session_id)  # same instant: the expiry does not move
    assert beat.expire_time == created.expire_time
    assert beat.renewal_count == 0


@pytest.mark.parametrize("activity", list(ACTIVITIES))
async def test_activity_does_not_renew_without_auto_renew(
    client: AsyncSessionsClient, clock: ManualClock, unique: str, activity: str
) -> None:
    session_id = f"{unique}/manual"
    created = await client.create_session(
        agent_id="echo", session_id=session_id, timeout_policy={"autoRenew": False}
    )
    assert not created.effective_timeout_policy.auto_renew
    assert created.effective_timeout_policy.auto_renew_source == SESSION
    deadline = ts(created.create_time) + minutes(30)

    for _ in range(3):
        clock.advance(minutes=9)
        session = await ACTIVITIES[activity](client, session_id)
        assert ts(session.expire_time) == deadline
        assert ts(session.last_activity_time) == clock.now()
        assert session.renewal_count == 0

    clock.set(deadline - US)
    await ACTIVITIES[activity](client, session_id)
    clock.set(deadline)
    assert (await client.get_session(session_id=session_id)).status == EXPIRED


async def test_turning_auto_renew_on_counts_from_the_last_activity(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    """The brief's rule: expire = (auto-renew ? last activity : creation) + timeout, also after an update."""
    session_id = f"{unique}/switch-on"
    created = await client.create_session(
        agent_id="echo", session_id=session_id, timeout_policy={"autoRenew": False}
    )
    clock.advance(minutes=10)
    active_at = (await client.heartbeat(session_id=session_id)).last_activity_time
    assert ts(active_at) == ts(created.create_time) + minutes(10)
    clock.advance(minutes=5)
    updated = await client.update_session(session_id=session_id, timeout_policy={"autoRenew": True})
    assert updated.effective_timeout_policy.auto_renew
    assert ts(updated.expire_time) == ts(active_at) + minutes(30)

    turned_off = await client.update_session(session_id=session_id, timeout_policy={"autoRenew": False})
    assert ts(turned_off.expire_time) == ts(active_at) + minutes(30)


async def test_manual_renew_works_without_auto_renew(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    session_id = f"{unique}/renew-off"
    await client.create_session(agent_id="echo", session_id=session_id, timeout_policy={"autoRenew": False})
    clock.advance(minutes=20)

    renewed = await client.renew_session(session_id=session_id)
    assert ts(renewed.expire_time) == clock.now() + minutes(30)
    assert renewed.renewal_count == 1

    # Activity after a manual renewal still does not move the expiry.
    clock.advance(minutes=10)
    beat = await client.heartbeat(session_id=session_id)
    assert beat.expire_time == renewed.expire_time
    assert beat.renewal_count == 1


async def test_manual_renew_with_auto_renew(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    session_id = f"{unique}/renew-on"
    await client.create_session(agent_id="echo", session_id=session_id)
    clock.advance(minutes=10)
    renewed = await client.renew_session(session_id=session_id)
    assert ts(renewed.expire_time) == clock.now() + minutes(30)
    assert renewed.renewal_count == 1
    assert ts(renewed.update_time) == clock.now()


# --- the hard cap -------------------------------------------------------------------------------------------


async def test_expiry_never_passes_the_cap(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    session_id = f"{unique}/cap"
    created = await client.create_session(
        agent_id="echo",
        session_id=session_id,
        timeout_policy={"timeoutMinutes": 60, "maxDurationMinutes": 90},
    )
    start = ts(created.create_time)
    cap = start + minutes(90)
    assert ts(created.max_expire_time) == cap
    assert ts(created.expire_time) == start + minutes(60)

    clock.advance(minutes=40)
    partial = await client.heartbeat(session_id=session_id)
    assert ts(partial.expire_time) == cap  # now + 60 would pass the cap
    assert partial.renewal_count == 1

    clock.advance(minutes=20)
    at_cap = await client.heartbeat(session_id=session_id)
    assert ts(at_cap.expire_time) == cap
    assert at_cap.renewal_count == 1  # nothing moved

    with raises(errors.FailedPrecondition, "MAX_DURATION_REACHED", session_id=session_id) as info:
        await client.renew_session(session_id=session_id)
    assert info.value.metadata["max_duration_minutes"] == "90"
    after = await client.get_session(session_id=session_id)
    assert after.etag == at_cap.etag

    clock.set(cap - US)
    assert (await client.get_session(session_id=session_id)).status == ACTIVE
    clock.set(cap)
    assert (await client.get_session(session_id=session_id)).status == EXPIRED


async def test_manual_renew_up_to_the_cap_then_refused(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    session_id = f"{unique}/renew-cap"
    created = await client.create_session(
        agent_id="echo",
        session_id=session_id,
        timeout_policy={"timeoutMinutes": 30, "maxDurationMinutes": 45, "autoRenew": False},
    )
    cap = ts(created.create_time) + minutes(45)
    clock.advance(minutes=25)

    renewed = await client.renew_session(session_id=session_id)
    assert ts(renewed.expire_time) == cap
    assert renewed.renewal_count == 1

    with raises(errors.FailedPrecondition, "MAX_DURATION_REACHED", session_id=session_id):
        await client.renew_session(session_id=session_id)
    assert (await client.get_session(session_id=session_id)).renewal_count == 1


async def test_max_duration_shorter_than_the_timeout(client: AsyncSessionsClient, unique: str) -> None:
    session_id = f"{unique}/short-cap"
    created = await client.create_session(
        agent_id="echo",
        session_id=session_id,
        timeout_policy={"timeoutMinutes": 60, "maxDurationMinutes": 20},
    )
    assert ts(created.expire_time) == ts(created.max_expire_time) == ts(created.create_time) + minutes(20)
    with raises(errors.FailedPrecondition, "MAX_DURATION_REACHED", session_id=session_id):
        await client.renew_session(session_id=session_id)


async def test_raising_the_cap_allows_renewal_again(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    session_id = f"{unique}/lift-cap"
    created = await client.create_session(
        agent_id="echo",
        session_id=session_id,
        timeout_policy={"timeoutMinutes": 30, "maxDurationMinutes": 30},
    )
    clock.advance(minutes=10)
    with raises(errors.FailedPrecondition, "MAX_DURATION_REACHED", session_id=session_id):
        await client.renew_session(session_id=session_id)

    lifted = await client.update_session(session_id=session_id, timeout_policy={"maxDurationMinutes": 120})
    assert ts(lifted.max_expire_time) == ts(created.create_time) + minutes(120)
    assert lifted.expire_time == created.expire_time  # still counted from the last renewal (the start)
    renewed = await client.renew_session(session_id=session_id)
    assert ts(renewed.expire_time) == clock.now() + minutes(30)
    assert renewed.renewal_count == 1


async def test_renew_expired_session_is_expired_not_capped(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    session_id = f"{unique}/renew-late"
    await client.create_session(
        agent_id="echo",
        session_id=session_id,
        timeout_policy={"timeoutMinutes": 30, "maxDurationMinutes": 30},
    )
    clock.advance(minutes=31)
    with raises(errors.FailedPrecondition, "SESSION_EXPIRED", session_id=session_id):
        await client.renew_session(session_id=session_id)


# --- precedence: session > agent > global, field by field ---------------------------------------------------

PRECEDENCE = [
    pytest.param({}, {}, (30, True, 720, 5), (GLOBAL, GLOBAL, GLOBAL, GLOBAL), id="global-only"),
    pytest.param(
        {"timeoutMinutes": 45, "warningThresholdMinutes": 10},
        {},
        (45, True, 720, 10),
        (AGENT, GLOBAL, GLOBAL, AGENT),
        id="agent-over-global",
    ),
    pytest.param(
        {"timeoutMinutes": 45, "warningThresholdMinutes": 10},
        {"timeoutMinutes": 60},
        (60, True, 720, 10),
        (SESSION, GLOBAL, GLOBAL, AGENT),
        id="session-over-agent",
    ),
    pytest.param(
        {"timeoutMinutes": 45, "autoRenew": False, "maxDurationMinutes": 120, "warningThresholdMinutes": 10},
        {"autoRenew": True, "maxDurationMinutes": 240},
        (45, True, 240, 10),
        (AGENT, SESSION, SESSION, AGENT),
        id="mixed",
    ),
    pytest.param(
        {"timeoutMinutes": 45, "autoRenew": False, "maxDurationMinutes": 120, "warningThresholdMinutes": 10},
        {},
        (45, False, 120, 10),
        (AGENT, AGENT, AGENT, AGENT),
        id="agent-only",
    ),
    pytest.param(
        {"timeoutMinutes": 45, "autoRenew": True, "maxDurationMinutes": 120, "warningThresholdMinutes": 10},
        {"timeoutMinutes": 5, "autoRenew": False, "maxDurationMinutes": 5, "warningThresholdMinutes": 1},
        (5, False, 5, 1),
        (SESSION, SESSION, SESSION, SESSION),
        id="session-only",
    ),
]


@pytest.mark.parametrize(("agent_tier", "session_tier", "values", "tiers"), PRECEDENCE)
async def test_policy_precedence(
    client: AsyncSessionsClient,
    clock: ManualClock,
    unique: str,
    agent_tier: dict[str, Any],
    session_tier: dict[str, Any],
    values: tuple[int, bool, int, int],
    tiers: tuple[int, int, int, int],
) -> None:
    agent_id = f"agent-{unique}"
    agent = await client.create_agent(
        agent={"agent_id": agent_id, "echo": {}, "timeout_defaults": agent_tier}
    )
    assert agent.timeout_defaults == TimeoutPolicy(**_snake(agent_tier))

    created = await client.create_session(
        agent_id=agent_id, session_id=f"{unique}/tiers", timeout_policy=session_tier
    )
    assert effective(created) == values
    assert sources(created) == tiers
    assert created.timeout_policy == TimeoutPolicy(**_snake(session_tier))  # only the session tier
    start = ts(created.create_time)
    timeout, _, max_duration, _ = values
    assert ts(created.max_expire_time) == start + minutes(max_duration)
    assert ts(created.expire_time) == start + minutes(min(timeout, max_duration))
    assert await client.get_session(session_id=created.session_id) == created


def _snake(policy: dict[str, Any]) -> dict[str, Any]:
    names = {
        "timeoutMinutes": "timeout_minutes",
        "autoRenew": "auto_renew",
        "maxDurationMinutes": "max_duration_minutes",
        "warningThresholdMinutes": "warning_threshold_minutes",
    }
    return {names[k]: v for k, v in policy.items()}


async def test_agent_without_auto_renew_governs_its_sessions(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    agent_id = f"agent-{unique}"
    await client.create_agent(
        agent={"agent_id": agent_id, "echo": {}, "timeout_defaults": {"autoRenew": False}}
    )
    created = await client.create_session(agent_id=agent_id, session_id=f"{unique}/agent-off")
    assert created.effective_timeout_policy.auto_renew_source == AGENT

    clock.advance(minutes=10)
    beat = await client.heartbeat(session_id=created.session_id)
    assert beat.expire_time == created.expire_time
    assert beat.renewal_count == 0


async def test_update_falls_back_to_the_agent_tier(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    agent_id = f"agent-{unique}"
    await client.create_agent(
        agent={"agent_id": agent_id, "echo": {}, "timeout_defaults": {"timeoutMinutes": 45}}
    )
    created = await client.create_session(
        agent_id=agent_id, session_id=f"{unique}/fallback", timeout_policy={"timeoutMinutes": 90}
    )
    assert ts(created.expire_time) == ts(created.create_time) + minutes(90)

    reset = await client.update_session(
        session_id=created.session_id, timeout_policy={}, update_mask=["timeout_policy.timeout_minutes"]
    )
    assert reset.effective_timeout_policy.timeout_minutes == 45
    assert reset.effective_timeout_policy.timeout_minutes_source == AGENT
    assert ts(reset.expire_time) == ts(created.create_time) + minutes(45)


# --- ranges: rejected, never clamped ------------------------------------------------------------------------

OUT_OF_RANGE = [
    ("timeout_minutes", 4, 5, 1440),
    ("timeout_minutes", 1441, 5, 1440),
    ("timeout_minutes", 0, 5, 1440),
    ("timeout_minutes", -30, 5, 1440),
    ("max_duration_minutes", 721, 5, 720),
    ("max_duration_minutes", 4, 5, 720),
    ("warning_threshold_minutes", 0, 1, 1440),
    ("warning_threshold_minutes", 1441, 1, 1440),
]


def _check_range_error(err: errors.AgentSessionsError, field: str, value: int, low: int, high: int) -> None:
    assert err.field_violations, err
    name, description = err.field_violations[0]
    assert name == field
    assert f"between {low} and {high}" in description
    assert str(value) in description
    assert err.metadata["field"] == field


@pytest.mark.parametrize(("field", "value", "low", "high"), OUT_OF_RANGE)
async def test_out_of_range_session_policy_is_rejected(
    client: AsyncSessionsClient, unique: str, field: str, value: int, low: int, high: int
) -> None:
    session_id = f"{unique}/range"
    with raises(errors.InvalidArgument, "TIMEOUT_OUT_OF_RANGE") as info:
        await client.create_session(
            agent_id="echo", session_id=session_id, timeout_policy=TimeoutPolicy(**{field: value})
        )
    _check_range_error(info.value, f"session.timeout_policy.{field}", value, low, high)
    with raises(errors.NotFound, "SESSION_NOT_FOUND"):
        await client.get_session(session_id=session_id)


@pytest.mark.parametrize(("field", "value", "low", "high"), OUT_OF_RANGE)
async def test_out_of_range_update_is_rejected(
    client: AsyncSessionsClient, unique: str, field: str, value: int, low: int, high: int
) -> None:
    session_id = f"{unique}/range-upd"
    created = await client.create_session(agent_id="echo", session_id=session_id)
    with raises(errors.InvalidArgument, "TIMEOUT_OUT_OF_RANGE") as info:
        await client.update_session(session_id=session_id, timeout_policy=TimeoutPolicy(**{field: value}))
    _check_range_error(info.value, f"session.timeout_policy.{field}", value, low, high)
    assert await client.get_session(session_id=session_id) == created


@pytest.mark.parametrize(("field", "value", "low", "high"), OUT_OF_RANGE)
async def test_out_of_range_agent_defaults_are_rejected(
    client: AsyncSessionsClient, unique: str, field: str, value: int, low: int, high: int
) -> None:
    agent_id = f"agent-{unique}"
    with raises(errors.InvalidArgument, "TIMEOUT_OUT_OF_RANGE") as info:
        await client.create_agent(
            agent=Agent(
                agent_id=agent_id, echo=EchoBackend(), timeout_defaults=TimeoutPolicy(**{field: value})
            )
        )
    _check_range_error(info.value, f"agent.timeout_defaults.{field}", value, low, high)
    with raises(errors.NotFound, "AGENT_NOT_FOUND"):
        await client.get_agent(agent_id=agent_id)


async def test_every_violation_is_listed(client: AsyncSessionsClient, unique: str) -> None:
    with raises(errors.InvalidArgument, "TIMEOUT_OUT_OF_RANGE") as info:
        await client.create_session(
            agent_id="echo",
            session_id=f"{unique}/many",
            timeout_policy=TimeoutPolicy(
                timeout_minutes=2, max_duration_minutes=9999, warning_threshold_minutes=0
            ),
        )
    assert [f for f, _ in info.value.field_violations] == [
        "session.timeout_policy.timeout_minutes",
        "session.timeout_policy.max_duration_minutes",
        "session.timeout_policy.warning_threshold_minutes",
    ]


@pytest.mark.parametrize(
    "policy",
    [
        TimeoutPolicy(timeout_minutes=5),
        TimeoutPolicy(timeout_minutes=1440),
        TimeoutPolicy(max_duration_minutes=5),
        TimeoutPolicy(max_duration_minutes=720),
        TimeoutPolicy(warning_threshold_minutes=1),
        TimeoutPolicy(warning_threshold_minutes=1440),
    ],
    ids=lambda p: str(p).replace("\n", ""),
)
async def test_range_limits_are_accepted_as_given(
    client: AsyncSessionsClient, unique: str, policy: TimeoutPolicy
) -> None:
    created = await client.create_session(agent_id="echo", session_id=f"{unique}/edge", timeout_policy=policy)
    ((descriptor, value),) = policy.ListFields()
    assert getattr(created.effective_timeout_policy, descriptor.name) == value
    assert created.timeout_policy == policy


# --- global defaults from the environment -------------------------------------------------------------------


async def test_global_defaults_come_from_settings(
    start: StartServer, clock: ManualClock, unique: str
) -> None:
    client = await start(
        default_timeout_minutes=10,
        max_duration_minutes=60,
        warning_threshold_minutes=2,
        auto_renew=False,
    )
    created = await client.create_session(agent_id="echo", session_id=f"{unique}/env")
    start_time = ts(created.create_time)
    assert effective(created) == (10, False, 60, 2)
    assert sources(created) == (GLOBAL, GLOBAL, GLOBAL, GLOBAL)
    assert ts(created.expire_time) == start_time + minutes(10)
    assert ts(created.max_expire_time) == start_time + minutes(60)

    clock.advance(minutes=8)
    beat = await client.heartbeat(session_id=created.session_id)
    assert beat.expire_time == created.expire_time  # auto-renew is off globally
    assert not beat.near_expiration
    clock.advance(minutes=1)
    assert (await client.get_session(session_id=created.session_id)).near_expiration
    clock.advance(minutes=1)
    assert (await client.get_session(session_id=created.session_id)).status == EXPIRED


async def test_ranges_come_from_settings(start: StartServer, unique: str) -> None:
    client = await start(min_timeout_minutes=10, max_timeout_minutes=100, max_duration_minutes=60)
    cases = [
        ("timeout_minutes", 9, 10, 100),
        ("timeout_minutes", 101, 10, 100),
        ("max_duration_minutes", 61, 10, 60),
        ("max_duration_minutes", 9, 10, 60),
        ("warning_threshold_minutes", 101, 1, 100),
    ]
    for field, value, low, high in cases:
        with raises(errors.InvalidArgument, "TIMEOUT_OUT_OF_RANGE") as info:
            await client.create_session(agent_id="echo", timeout_policy=TimeoutPolicy(**{field: value}))
        _check_range_error(info.value, f"session.timeout_policy.{field}", value, low, high)

    ok = await client.create_session(
        agent_id="echo",
        session_id=f"{unique}/in-range",
        timeout_policy=TimeoutPolicy(timeout_minutes=100, max_duration_minutes=60),
    )
    assert effective(ok)[0::2] == (100, 60)


async def test_settings_that_break_their_own_ranges_are_refused(database: DatabaseTarget) -> None:
    # A default timeout below the minimum would make every session out of range: refuse to start.
    with pytest.raises(StartupError) as info:  # the CLI prints it and exits 2
        await start_server(make_settings(database, default_timeout_minutes=4))
    assert "SESSION_*_MINUTES settings disagree" in str(info.value)
    assert "must be between 5 and 1440 minutes, got 4" in str(info.value)


async def test_server_stats_agree_with_near_expiration(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    # The counts span the whole database: move to a moment when no other test's session can be alive
    # (every session expires within max_duration of its start, and the other tests live around 2030).
    clock.set(datetime(2100, 1, 1, tzinfo=UTC) + timedelta(days=int(unique[:4], 16)))
    created = await client.create_session(agent_id="echo", session_id=f"{unique}/stats")
    warn_at = ts(created.expire_time) - minutes(5)

    async def observed() -> tuple[bool, int, int]:
        session = await client.get_session(session_id=created.session_id)
        stats = await client.get_server_stats()
        return session.near_expiration, stats.active_sessions, stats.expiring_soon_sessions

    assert await observed() == (False, 1, 0)
    clock.set(warn_at)  # exactly the threshold left: not "less time left than" it
    assert await observed() == (False, 1, 0)
    clock.set(warn_at + US)
    assert await observed() == (True, 1, 1)
    clock.set(ts(created.expire_time))
    assert await observed() == (False, 0, 0)
