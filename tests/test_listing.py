"""ListSessions through the published client: filters, newest-first order, and paging with tokens."""

from __future__ import annotations

import pytest

from agentsessions import AsyncSessionsClient, Session, SessionStatus, errors
from sessiond.domain.clock import ManualClock

DOMAIN = "agentsessions.v1"
ACTIVE = SessionStatus.SESSION_STATUS_ACTIVE
EXPIRED = SessionStatus.SESSION_STATUS_EXPIRED
ENDED = SessionStatus.SESSION_STATUS_ENDED


def assert_invalid(err: errors.AgentSessionsError, field: str) -> None:
    assert isinstance(err, errors.InvalidArgument), err
    assert err.domain == DOMAIN
    assert field in [f for f, _ in err.field_violations], err.field_violations


async def ids(client: AsyncSessionsClient, **filters: object) -> list[str]:
    pager = await client.list_sessions(**filters)  # type: ignore[arg-type]
    return [s.session_id async for s in pager]


async def pages_of(client: AsyncSessionsClient, **filters: object) -> list[list[str]]:
    pager = await client.list_sessions(**filters)  # type: ignore[arg-type]
    pages: list[list[str]] = []
    async for page in pager.pages:
        pages.append([s.session_id for s in page.sessions])
        assert len(pages) < 1000, "paging does not end"
    return pages


async def make_agent(client: AsyncSessionsClient, agent_id: str) -> None:
    await client.create_agent(agent={"agentId": agent_id, "echo": {}})


async def test_filter_by_agent(client: AsyncSessionsClient, unique: str) -> None:
    agent_a, agent_b = f"a-{unique}", f"b-{unique}"
    await make_agent(client, agent_a)
    await make_agent(client, agent_b)
    user = f"user-{unique}"
    made: dict[str, list[str]] = {agent_a: [], agent_b: [], "echo": []}
    for i, agent in enumerate([agent_a, agent_b, agent_a, "echo", agent_a, agent_b]):
        s = await client.create_session(agent_id=agent, session_id=f"{unique}/s{i}", user_id=user)
        made[agent].append(s.session_id)
    assert await ids(client, agent_id=agent_a) == made[agent_a][::-1]
    assert await ids(client, agent_id=agent_b) == made[agent_b][::-1]
    assert await ids(client, agent_id="echo", user_id=user) == made["echo"]
    assert await ids(client, agent_id=f"none-{unique}") == []
    everything = await ids(client, user_id=user)
    assert sorted(everything) == sorted(s for v in made.values() for s in v)
    listed = (await client.list_sessions(agent_id=agent_a)).first_page.sessions
    assert all(s.agent_id == agent_a and s.user_id == user for s in listed)


async def test_filter_by_user(client: AsyncSessionsClient, unique: str) -> None:
    alice, bob = f"alice-{unique}", f"bob-{unique}"
    for i, user in enumerate([alice, bob, alice, alice]):
        await client.create_session(agent_id="echo", session_id=f"{unique}/u{i}", user_id=user)
    assert await ids(client, user_id=alice) == [f"{unique}/u3", f"{unique}/u2", f"{unique}/u0"]
    assert await ids(client, user_id=bob) == [f"{unique}/u1"]
    # Exact match only: no prefix, no case folding.
    assert await ids(client, user_id=f"alice-{unique[:-1]}") == []
    assert await ids(client, user_id=alice.upper()) == []


async def test_filter_by_status(client: AsyncSessionsClient, clock: ManualClock, unique: str) -> None:
    user = f"user-{unique}"

    async def create(name: str, minutes: int) -> str:
        s = await client.create_session(
            agent_id="echo",
            session_id=f"{unique}/{name}",
            user_id=user,
            timeout_policy={"timeoutMinutes": minutes, "autoRenew": False},
        )
        return s.session_id

    long_lived = await create("long", 120)
    short_lived = await create("short", 10)
    ended = await create("ended", 120)
    ended_then_expired = await create("ended-short", 10)
    await client.end_session(session_id=ended)
    await client.end_session(session_id=ended_then_expired)

    assert await ids(client, user_id=user, status=ACTIVE) == [short_lived, long_lived]
    assert await ids(client, user_id=user, status=EXPIRED) == []
    assert await ids(client, user_id=user, status=ENDED) == [ended_then_expired, ended]

    clock.advance(minutes=10)  # exactly the short session's expire time: it has expired
    assert await ids(client, user_id=user, status="active") == [long_lived]
    assert await ids(client, user_id=user, status="expired") == [short_lived]
    # An ended session stays ENDED, whatever its expire time says.
    assert await ids(client, user_id=user, status="ended") == [ended_then_expired, ended]
    assert await ids(client, user_id=user) == [ended_then_expired, ended, short_lived, long_lived]
    assert await ids(client, user_id=user, status=SessionStatus.SESSION_STATUS_UNSPECIFIED) == [
        ended_then_expired,
        ended,
        short_lived,
        long_lived,
    ]
    # The status each listed session carries agrees with the filter.
    pager = await client.list_sessions(user_id=user)
    statuses = {s.session_id: s.status async for s in pager}
    assert statuses == {long_lived: ACTIVE, short_lived: EXPIRED, ended: ENDED, ended_then_expired: ENDED}

    clock.advance(hours=3)
    assert await ids(client, user_id=user, status=ACTIVE) == []
    assert await ids(client, user_id=user, status=EXPIRED) == [short_lived, long_lived]


async def test_filter_by_metadata(client: AsyncSessionsClient, unique: str) -> None:
    team = f"team-{unique}"
    specs = {
        "gold-prod": {"team": team, "env": "prod", "tier": "gold"},
        "prod": {"team": team, "env": "prod"},
        "dev": {"team": team, "env": "dev", "tier": "gold"},
        "other-team": {"team": f"{team}x", "env": "prod", "tier": "gold"},
        "none": {},
    }
    for name, metadata in specs.items():
        await client.create_session(agent_id="echo", session_id=f"{unique}/{name}", metadata=metadata)

    def named(*names: str) -> list[str]:
        return [f"{unique}/{n}" for n in names]

    assert await ids(client, metadata={"team": team}) == named("dev", "prod", "gold-prod")
    assert await ids(client, metadata={"team": team, "env": "prod"}) == named("prod", "gold-prod")
    assert await ids(client, metadata={"team": team, "env": "prod", "tier": "gold"}) == named("gold-prod")
    assert await ids(client, metadata={"team": team, "tier": "gold"}) == named("dev", "gold-prod")
    assert await ids(client, metadata={"team": team, "env": "staging"}) == []
    assert await ids(client, metadata={"team": team, "missing-key": "x"}) == []
    # Values match exactly.
    assert await ids(client, metadata={"team": team[:-1]}) == []
    assert await ids(client, metadata={"team": f"{team}x"}) == named("other-team")
    # Filters combine with the others.
    assert await ids(client, metadata={"team": team}, agent_id="echo", status="active") == named(
        "dev", "prod", "gold-prod"
    )
    assert await ids(client, metadata={"team": team}, status="ended") == []
    # Metadata changed by UpdateSession is what the filter sees.
    await client.update_session(session_id=f"{unique}/dev", metadata={"team": team, "env": "prod"})
    assert await ids(client, metadata={"team": team, "env": "prod"}) == named("dev", "prod", "gold-prod")
    assert await ids(client, metadata={"team": team, "tier": "gold"}) == named("gold-prod")


async def test_newest_first(client: AsyncSessionsClient, clock: ManualClock, unique: str) -> None:
    user = f"user-{unique}"
    created: list[Session] = []
    for i in range(6):
        created.append(
            await client.create_session(agent_id="echo", session_id=f"{unique}/n{i}", user_id=user)
        )
        if i % 2:
            clock.advance(seconds=1)
    pager = await client.list_sessions(user_id=user)
    listed = [s async for s in pager]
    assert [s.session_id for s in listed] == [s.session_id for s in reversed(created)]
    times = [s.create_time.ToDatetime() for s in listed]
    assert times == sorted(times, reverse=True)
    # Generated ids are time-ordered and listed newest first too.
    generated = [(await client.create_session(agent_id="echo", user_id=user)).session_id for _ in range(3)]
    assert (await ids(client, user_id=user))[:3] == generated[::-1]


async def test_paging_yields_every_match_once(client: AsyncSessionsClient, unique: str) -> None:
    user = f"user-{unique}"
    total = 23
    expected = [
        (
            await client.create_session(agent_id="echo", session_id=f"{unique}/p{i:02}", user_id=user)
        ).session_id
        for i in range(total)
    ][::-1]
    for size in (*range(1, 9), 11, 22, 23, 24, 1000):
        pages = await pages_of(client, user_id=user, page_size=size)
        assert [s for p in pages for s in p] == expected, size
        assert all(0 < len(p) <= size for p in pages)
        assert len(pages) == -(-total // size)
    # page_size 0 means the default (50): everything on one page here.
    assert await pages_of(client, user_id=user) == [expected]


async def test_sessions_created_while_paging_are_not_repeated(
    client: AsyncSessionsClient, unique: str
) -> None:
    user = f"user-{unique}"
    for i in range(6):
        await client.create_session(agent_id="echo", session_id=f"{unique}/c{i}", user_id=user)
    pager = await client.list_sessions(user_id=user, page_size=2)
    seen: list[str] = []
    async for page in pager.pages:
        seen += [s.session_id for s in page.sessions]
        await client.create_session(agent_id="echo", session_id=f"{unique}/late{len(seen)}", user_id=user)
    assert seen == [f"{unique}/c{i}" for i in range(5, -1, -1)]


async def test_deleted_sessions_leave_the_list(client: AsyncSessionsClient, unique: str) -> None:
    user = f"user-{unique}"
    for i in range(5):
        await client.create_session(agent_id="echo", session_id=f"{unique}/d{i}", user_id=user)
    first = (await client.list_sessions(user_id=user, page_size=2)).first_page
    await client.delete_session(session_id=f"{unique}/d2", force=True)
    rest = await client.list_sessions(user_id=user, page_size=2, page_token=first.next_page_token)
    after = [s.session_id async for s in rest]
    assert [s.session_id for s in first.sessions] + after == [f"{unique}/d{i}" for i in (4, 3, 1, 0)]


async def test_page_token_with_other_filters_is_rejected(client: AsyncSessionsClient, unique: str) -> None:
    user = f"user-{unique}"
    for i in range(4):
        await client.create_session(
            agent_id="echo", session_id=f"{unique}/t{i}", user_id=user, metadata={"k": unique}
        )
    filters: dict[str, object] = {"user_id": user, "metadata": {"k": unique}, "status": "active"}
    token = (await client.list_sessions(page_size=2, **filters)).first_page.next_page_token  # type: ignore[arg-type]
    assert token
    ok = await client.list_sessions(page_size=2, page_token=token, **filters)  # type: ignore[arg-type]
    assert [s.session_id for s in ok.first_page.sessions] == [f"{unique}/t1", f"{unique}/t0"]
    changed: list[dict[str, object]] = [
        {**filters, "user_id": f"{user}x"},
        {**filters, "agent_id": "echo"},
        {**filters, "status": "expired"},
        {**filters, "status": SessionStatus.SESSION_STATUS_UNSPECIFIED},
        {**filters, "metadata": {"k": unique, "other": "v"}},
        {**filters, "metadata": {}},
        {"user_id": user},
    ]
    for params in changed:
        with pytest.raises(errors.InvalidArgument) as info:
            await client.list_sessions(page_size=2, page_token=token, **params)  # type: ignore[arg-type]
        assert_invalid(info.value, "page_token")
    # A ListMessages token is no ListSessions token.
    await client.append_messages(
        session_id=f"{unique}/t0", messages=[{"role": "ROLE_USER", "parts": [{"text": {"text": "x"}}]}]
    )
    await client.append_text(session_id=f"{unique}/t0", role="user", text="y")
    messages_token = (
        await client.list_messages(session_id=f"{unique}/t0", page_size=1)
    ).first_page.next_page_token
    assert messages_token
    for garbage in (messages_token, "garbage", "=", token[:-2] + "zz"):
        with pytest.raises(errors.InvalidArgument) as info:
            await client.list_sessions(page_size=2, page_token=garbage, **filters)  # type: ignore[arg-type]
        assert_invalid(info.value, "page_token")


async def test_invalid_list_requests(client: AsyncSessionsClient, unique: str) -> None:
    for size in (-1, 1001):
        with pytest.raises(errors.InvalidArgument) as info:
            await client.list_sessions(page_size=size)
        assert_invalid(info.value, "page_size")
    assert len((await client.list_sessions(page_size=1000, user_id=unique)).first_page.sessions) == 0
    with pytest.raises(errors.InvalidArgument) as info:
        await client.list_sessions(status=SessionStatus.ValueType(17))
    assert_invalid(info.value, "status")
