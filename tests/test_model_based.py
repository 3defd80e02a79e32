"""A stateful, model-based test: random sequences of requests, through the published sync client, against a
real server, checked step by step against a small model of the contract (docs/design.md, Lifecycle).

The claim it tests: no sequence of requests corrupts a session or drops an acknowledged message. After
every step, every session of the example reads back exactly as the model says: its history (order,
sequences, ids, texts), its counters, its status and expiry to the microsecond, its etag. Every error must
be the one the contract names for that state, never INTERNAL or UNKNOWN.

Its event log too (docs/design.md, Session events): every change stores the events its operation names,
numbered from 1 per session (a session created again under a deleted one's name starts again at 1) with
no gap and no repeat; reads, no-op writes and refused writes store none; each event carries the session as
of it. After every step the events stored since the last step are read (one WatchSession from the last id
seen, for the sessions that have some) and checked against those the model expects; a rule replays a
whole log and finds the events seen so far, in order. The sweeper is off (conftest), so expiry pushes
(`expiring_soon`, `expired`) never happen here.

Hypothesis state machines are synchronous: the machine runs in a worker thread with the sync client, while
the server runs on the test's event loop; the worker moves the server's ManualClock between requests (no
request is in flight then). Each example works on sessions of its own (a fresh prefix), since the database
outlives the examples. Runs are repeatable (`derandomize`), with no example database.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from agentsessions import (
    Message,
    MessageOrder,
    Part,
    Role,
    Session,
    SessionEvent,
    SessionsClient,
    SessionStatus,
    TextPart,
    errors,
)
from sessiond.domain.clock import ManualClock

T = TypeVar("T")

DOMAIN = "agentsessions.v1"
ACTIVE = SessionStatus.SESSION_STATUS_ACTIVE
EXPIRED = SessionStatus.SESSION_STATUS_EXPIRED
ENDED = SessionStatus.SESSION_STATUS_ENDED
US = timedelta(microseconds=1)
ZERO = timedelta(0)

# The global tier of the policy (the server's defaults; test_timeouts.py checks them).
DEFAULT_POLICY = (30, True, 720, 5)  # timeout, auto-renew, max duration, warning threshold (minutes)

NAMES = ("s0", "s1", "s2")  # the pool of session names of one example
CALLER_IDS = tuple(f"m{i}" for i in range(6))  # few, so retries, re-appends after deletes and reuse collide

# What the contract lets each request fail with (docs/design.md, Errors). INTERNAL and UNKNOWN never.
DOCUMENTED: dict[type[errors.AgentSessionsError], set[str]] = {
    errors.InvalidArgument: {"INVALID_ARGUMENT"},
    errors.NotFound: {"SESSION_NOT_FOUND", "MESSAGE_NOT_FOUND"},
    errors.AlreadyExists: {"SESSION_ALREADY_EXISTS"},
    errors.FailedPrecondition: {"SESSION_EXPIRED", "SESSION_ENDED", "MAX_DURATION_REACHED", "SESSION_ACTIVE"},
    errors.Aborted: {"ETAG_MISMATCH"},
    errors.OutOfRange: {"EVENT_ID_AHEAD"},
}

texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1, max_size=12)
optional_ids = st.one_of(st.none(), st.sampled_from(CALLER_IDS))


def distinct_ids(items: list[tuple[str | None, str]]) -> list[tuple[str | None, str]]:
    """No caller id twice in one request (that is refused whole: `append_duplicate_ids`)."""
    seen: set[str] = set()
    out: list[tuple[str | None, str]] = []
    for message_id, text in items:
        out.append((None if message_id in seen else message_id, text))
        if message_id is not None:
            seen.add(message_id)
    return out


# (caller id or None, text): one to three messages to append, or up to two of a restored history.
batches = st.lists(st.tuples(optional_ids, texts), min_size=1, max_size=3).map(distinct_ids)
histories = st.lists(st.tuples(optional_ids, texts), max_size=2).map(distinct_ids)
policies = st.one_of(
    st.none(),  # the server's defaults
    st.tuples(st.sampled_from([30, 60, 5]), st.booleans(), st.sampled_from([720, 60, 10])),
)
# Clock moves: small ones (activity renews), ones past any timeout, and ones to a session's expiry edge.
# Mostly small, so that sessions live long enough to collect messages; a third past most timeouts.
seconds = st.integers(0, 240).map(lambda s: timedelta(seconds=s))
advances = st.one_of(seconds, seconds, st.integers(1, 90).map(lambda m: timedelta(minutes=m)))


def text_message(text: str, message_id: str | None) -> Message:
    return Message(message_id=message_id or "", role=Role.ROLE_USER, parts=[Part(text=TextPart(text=text))])


@dataclass
class Stored:
    sequence: int
    message_id: str
    text: str


def kind(event: SessionEvent) -> str:
    return event.WhichOneof("kind") or ""


def detail_of(event: SessionEvent, tz: Any) -> dict[str, Any]:
    """What an event of its kind carries besides the session (message bodies apart), comparable to the
    model's. The order of deleted ids is not part of the contract."""
    body = getattr(event, kind(event))
    if kind(event) == "messages_appended":
        return {"first_sequence": body.first_sequence, "last_sequence": body.last_sequence}
    if kind(event) == "messages_deleted":
        return {"message_ids": sorted(body.message_ids), "after_sequence": body.after_sequence}
    if kind(event) == "renewed":
        return {"expire_time": body.expire_time.ToDatetime(tzinfo=tz), "manual": body.manual}
    if kind(event) == "updated":
        return {"paths": list(body.paths)}
    if kind(event) == "restored":
        return {"message_count": body.message_count}
    assert not body.ListFields(), event  # ended, cleared: nothing more
    return {}


def snapshot_of(session: Session, tz: Any) -> tuple[Any, ...]:
    """The parts of an event's session the model knows."""
    return (
        session.session_id,
        session.status,
        session.message_count,
        session.last_sequence,
        session.expire_time.ToDatetime(tzinfo=tz),
        session.HasField("end_time"),
        session.renewal_count,
        dict(session.metadata),
        session.etag,
        session.last_event_id,
    )


def without_messages(event: SessionEvent) -> SessionEvent:
    """An event as stored: a replay fills in the appended messages still held, which change over time."""
    copy = SessionEvent()
    copy.CopyFrom(event)
    copy.messages_appended.ClearField("messages")
    return copy


@dataclass
class Expected:
    """A stored event the model expects: its id, kind and detail (`detail_of`), when it happened, and the
    session as of it (`snapshot_of`)."""

    event_id: int
    kind: str
    detail: dict[str, Any]
    time: datetime
    session: tuple[Any, ...]


@dataclass
class Model:
    """One session as the contract says it must be."""

    session_id: str
    timeout: timedelta
    auto_renew: bool
    max_duration: timedelta
    warning: timedelta
    expire_time: datetime
    max_expire_time: datetime
    etag: str
    messages: list[Stored] = field(default_factory=list)
    last_sequence: int = 0
    ended: bool = False
    renewal_count: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    etags: set[str] = field(default_factory=set)  # every etag this session has shown
    issued: set[int] = field(default_factory=set)  # every sequence number ever handed out
    acknowledged: list[list[tuple[str | None, str]]] = field(default_factory=list)  # appends that landed
    last_event_id: int = 0  # the id of the last event the session must have stored
    pending: list[Expected] = field(default_factory=list)  # expected, not read back yet
    log: list[SessionEvent] = field(default_factory=list)  # read back and checked: ids 1, 2, ...

    def status(self, now: datetime) -> SessionStatus.ValueType:
        if self.ended:
            return ENDED
        return EXPIRED if now >= self.expire_time else ACTIVE

    def closed_reason(self, now: datetime) -> str | None:
        return {ACTIVE: None, EXPIRED: "SESSION_EXPIRED", ENDED: "SESSION_ENDED"}[self.status(now)]

    def extend(self, now: datetime) -> None:
        """Renewal: expire = min(now + timeout, cap); renewal_count counts the times it actually moved."""
        expire = min(now + self.timeout, self.max_expire_time)
        if expire > self.expire_time:
            self.expire_time = expire
            self.renewal_count += 1

    def number(self, items: list[tuple[str | None, str]]) -> list[Stored]:
        """New messages get the next sequences; no number is handed out twice."""
        stored = []
        for message_id, text in items:
            self.last_sequence += 1
            assert self.last_sequence not in self.issued
            self.issued.add(self.last_sequence)
            stored.append(Stored(self.last_sequence, message_id or "", text))
        return stored


class SessionsMachine(RuleBasedStateMachine):
    """Set up by `machine_for`: `client` and `clock` are class attributes shared by every example."""

    client: SessionsClient
    clock: ManualClock
    prefix: str

    def __init__(self) -> None:
        super().__init__()
        self.example = f"{self.prefix}/{uuid.uuid4().hex[:8]}"
        self.sessions: dict[str, Model | None] = dict.fromkeys(NAMES)
        self.retired: dict[str, set[str]] = {name: set() for name in NAMES}  # etags of deleted incarnations

    # --- helpers ------------------------------------------------------------------------------------------

    def sid(self, name: str) -> str:
        return f"{self.example}/{name}"

    @property
    def now(self) -> datetime:
        return self.clock.now()

    def attempt(self, call: Callable[[], T]) -> T | errors.AgentSessionsError:
        """The call's answer, or its error once checked to be a typed, documented one."""
        try:
            return call()
        except errors.AgentSessionsError as err:
            assert type(err) in DOCUMENTED, f"undocumented status: {err!r}"
            assert err.domain == DOMAIN, err
            assert err.reason in DOCUMENTED[type(err)], f"undocumented reason: {err!r}"
            return err

    @staticmethod
    def fails(
        result: object,
        cls: type[errors.AgentSessionsError] | tuple[type[errors.AgentSessionsError], ...],
        *reasons: str,
    ) -> errors.AgentSessionsError:
        """`result` is the error `cls` with one of `reasons`."""
        assert isinstance(result, cls), f"expected {cls} {reasons}, got {result!r}"
        assert result.reason in reasons, f"expected {cls} {reasons}, got {result!r}"
        return result

    @staticmethod
    def succeeds(result: T | errors.AgentSessionsError) -> T:
        assert not isinstance(result, errors.AgentSessionsError), f"unexpected error: {result!r}"
        return result

    def missing(self, name: str, call: Callable[[], object]) -> None:
        self.fails(self.attempt(call), errors.NotFound, "SESSION_NOT_FOUND")

    def check_session(self, model: Model, session: Session, *, changed: bool) -> None:
        """`session` as the server answered it, against the model. `changed`: the request changed the
        session, so its etag must be new (never one shown before, by this session or one deleted under its
        name); else the etag must not have moved (reads, no-op writes, refused writes)."""
        now = self.now
        status = model.status(now)
        assert session.session_id == model.session_id
        assert (session.status, session.message_count, session.last_sequence) == (
            status,
            len(model.messages),
            model.last_sequence,
        ), (session.status, session.message_count, session.last_sequence, status, model)
        assert session.expire_time.ToDatetime(tzinfo=now.tzinfo) == model.expire_time, (session, model)
        assert session.max_expire_time.ToDatetime(tzinfo=now.tzinfo) == model.max_expire_time, (
            session,
            model,
        )
        assert session.HasField("end_time") == model.ended
        assert session.renewal_count == model.renewal_count, (session.renewal_count, model.renewal_count)
        remaining = model.expire_time - now if status == ACTIVE else ZERO
        assert session.time_remaining.ToTimedelta() == remaining
        assert session.near_expiration == (status == ACTIVE and remaining < model.warning)
        assert dict(session.metadata) == model.metadata
        assert session.last_event_id == model.last_event_id, (session.last_event_id, model.last_event_id)
        if changed:
            assert session.etag != model.etag, "a write that changed the session kept its etag"
            assert session.etag not in model.etags, "an etag came back for another version"
            assert session.etag not in self.retired[self.name_of(model)], "etag of a deleted incarnation"
            model.etag = session.etag
            model.etags.add(session.etag)
        else:
            assert session.etag == model.etag, "the etag moved with no change to the session"

    def expect(self, model: Model, answer: Session, event_kind: str, **detail: Any) -> None:
        """The write just answered `answer` stored one event: `event_kind` with `detail` (`detail_of`),
        carrying the session as the model now has it, with the answer's etag. Called before
        `check_session`, which then finds the new id in the answer."""
        model.last_event_id += 1
        now = self.now
        session = (
            model.session_id,
            model.status(now),
            len(model.messages),
            model.last_sequence,
            model.expire_time,
            model.ended,
            model.renewal_count,
            dict(model.metadata),
            answer.etag,
            model.last_event_id,
        )
        model.pending.append(Expected(model.last_event_id, event_kind, detail, now, session))

    def read_events(self, model: Model, after: int, count: int) -> list[SessionEvent]:
        """The `count` stored events after `after`: a watch without resumption, read until it caught up
        and then cancelled. A watch that never delivers them is cancelled after a while, so a missing
        event fails the check instead of hanging the test."""
        stream = self.client.watch_session(session_id=model.session_id, after_event_id=after, resume=False)
        timer = threading.Timer(5, stream.cancel)
        timer.start()
        events: list[SessionEvent] = []
        try:
            if count:
                for event in stream:
                    events.append(event)
                    if len(events) == count:
                        break
        finally:
            timer.cancel()
            stream.cancel()
        assert len(events) == count, f"{len(events)} events after {after}, expected {count}: {events}"
        return events

    def check_appended(self, model: Model, event: SessionEvent) -> None:
        """A messages_appended event carries the messages of its range that the session still holds."""
        if kind(event) != "messages_appended":
            return
        appended = event.messages_appended
        held = [m for m in model.messages if appended.first_sequence <= m.sequence <= appended.last_sequence]
        assert [(m.sequence, m.message_id, m.text) for m in held] == [
            (m.sequence, m.message_id, m.parts[0].text.text) for m in appended.messages
        ], (held, appended.messages)

    def check_events(self, model: Model) -> None:
        """Reads the events stored since the last check and compares them with those the model expects."""
        if not model.pending:
            return
        tz = self.now.tzinfo
        got = self.read_events(model, len(model.log), len(model.pending))
        for want, event in zip(model.pending, got, strict=True):
            assert (event.session_id, event.event_id, kind(event), detail_of(event, tz)) == (
                model.session_id,
                want.event_id,
                want.kind,
                want.detail,
            ), (event, want)
            assert event.time.ToDatetime(tzinfo=tz) == want.time, (event, want)
            assert snapshot_of(event.session, tz) == want.session, (event.session, want)
            self.check_appended(model, event)
        model.log += got
        model.pending.clear()

    def name_of(self, model: Model) -> str:
        return model.session_id.rsplit("/", 1)[1]

    def check_messages(self, model: Model, got: list[Message]) -> None:
        assert [(m.sequence, m.text) for m in model.messages] == [
            (m.sequence, m.parts[0].text.text) for m in got
        ], (model.messages, got)
        for expected, message in zip(model.messages, got, strict=True):
            assert message.session_id == model.session_id
            if expected.message_id:
                assert message.message_id == expected.message_id, (expected, message)
            else:
                expected.message_id = message.message_id  # generated: remembered from its first answer
        ids = [m.message_id for m in got]
        assert all(ids) and len(set(ids)) == len(ids), ids

    # --- sessions -----------------------------------------------------------------------------------------

    @initialize(chosen=st.lists(policies, min_size=len(NAMES), max_size=len(NAMES)))
    def create_the_pool(self, chosen: list[tuple[int, bool, int] | None]) -> None:
        for name, policy in zip(NAMES, chosen, strict=True):
            self.create(name, policy)

    @rule(name=st.sampled_from(NAMES), policy=policies)
    def create(self, name: str, policy: tuple[int, bool, int] | None) -> None:
        timeout_policy = None
        if policy is not None:
            timeout_policy = {
                "timeoutMinutes": policy[0],
                "autoRenew": policy[1],
                "maxDurationMinutes": policy[2],
            }
        result = self.attempt(
            lambda: self.client.create_session(
                agent_id="echo", session_id=self.sid(name), timeout_policy=timeout_policy
            )
        )
        if self.sessions[name] is not None:
            self.fails(result, errors.AlreadyExists, "SESSION_ALREADY_EXISTS")
            return
        session = self.succeeds(result)
        timeout, auto_renew, max_duration = policy or DEFAULT_POLICY[:3]
        e = session.effective_timeout_policy
        assert (e.timeout_minutes, e.auto_renew, e.max_duration_minutes, e.warning_threshold_minutes) == (
            timeout,
            auto_renew,
            max_duration,
            DEFAULT_POLICY[3],
        )
        now = self.now
        cap = now + timedelta(minutes=max_duration)
        model = Model(
            session_id=self.sid(name),
            timeout=timedelta(minutes=timeout),
            auto_renew=auto_renew,
            max_duration=timedelta(minutes=max_duration),
            warning=timedelta(minutes=DEFAULT_POLICY[3]),
            expire_time=min(now + timedelta(minutes=timeout), cap),
            max_expire_time=cap,
            etag="",
        )
        self.check_session(model, session, changed=True)
        self.sessions[name] = model

    @rule(
        name=st.sampled_from(NAMES),
        force=st.booleans(),
        with_etag=st.booleans(),
        create_again=st.one_of(st.none(), policies.map(lambda p: (p,))),
    )
    def delete_session(
        self,
        name: str,
        force: bool,
        with_etag: bool,
        create_again: tuple[tuple[int, bool, int] | None] | None,
    ) -> None:
        """Deletes a session; maybe creates it again under its name at once (a client starting the
        conversation over): nothing of the deleted one may show through, its etags included."""
        model = self.sessions[name]
        etag = model.etag if model is not None and with_etag else ""
        result = self.attempt(
            lambda: self.client.delete_session(session_id=self.sid(name), force=force, etag=etag)
        )
        if model is None:
            self.fails(result, errors.NotFound, "SESSION_NOT_FOUND")
        elif not force and model.status(self.now) == ACTIVE:
            self.fails(result, errors.FailedPrecondition, "SESSION_ACTIVE")
        else:
            self.succeeds(result)
            self.retired[name] |= model.etags
            self.sessions[name] = None
        if create_again is not None:
            self.create(name, create_again[0])

    @rule(name=st.sampled_from(NAMES))
    def get_session(self, name: str) -> None:
        model = self.sessions[name]
        if model is None:
            self.missing(name, lambda: self.client.get_session(session_id=self.sid(name)))
            return
        self.check_session(model, self.client.get_session(session_id=self.sid(name)), changed=False)

    @rule(name=st.sampled_from(NAMES))
    def heartbeat(self, name: str) -> None:
        model = self.sessions[name]
        result = self.attempt(lambda: self.client.heartbeat(session_id=self.sid(name)))
        if model is None:
            self.fails(result, errors.NotFound, "SESSION_NOT_FOUND")
        elif reason := model.closed_reason(self.now):
            self.fails(result, errors.FailedPrecondition, reason)
        else:
            before = model.expire_time
            if model.auto_renew:
                model.extend(self.now)
            session = self.succeeds(result)
            if model.expire_time != before:  # a heartbeat that did not move the expiry is no event
                self.expect(model, session, "renewed", expire_time=model.expire_time, manual=False)
            self.check_session(model, session, changed=True)

    @rule(name=st.sampled_from(NAMES))
    def renew(self, name: str) -> None:
        model = self.sessions[name]
        result = self.attempt(lambda: self.client.renew_session(session_id=self.sid(name)))
        if model is None:
            self.fails(result, errors.NotFound, "SESSION_NOT_FOUND")
        elif reason := model.closed_reason(self.now):
            self.fails(result, errors.FailedPrecondition, reason)
        elif model.expire_time >= model.max_expire_time:
            self.fails(result, errors.FailedPrecondition, "MAX_DURATION_REACHED")
        else:
            before = model.expire_time
            model.extend(self.now)
            session = self.succeeds(result)
            if model.expire_time != before:
                self.expect(model, session, "renewed", expire_time=model.expire_time, manual=True)
            self.check_session(model, session, changed=True)

    @rule(name=st.sampled_from(NAMES))
    def end(self, name: str) -> None:
        model = self.sessions[name]
        result = self.attempt(lambda: self.client.end_session(session_id=self.sid(name)))
        if model is None:
            self.fails(result, errors.NotFound, "SESSION_NOT_FOUND")
            return
        changed = not model.ended  # idempotent; an expired session ends too
        model.ended = True
        session = self.succeeds(result)
        if changed:
            self.expect(model, session, "ended")
        self.check_session(model, session, changed=changed)

    @rule(name=st.sampled_from(NAMES))
    def clear(self, name: str) -> None:
        model = self.sessions[name]
        result = self.attempt(lambda: self.client.clear_session(session_id=self.sid(name)))
        if model is None:
            self.fails(result, errors.NotFound, "SESSION_NOT_FOUND")
        elif model.ended:
            self.fails(result, errors.FailedPrecondition, "SESSION_ENDED")
        else:
            now = self.now
            changed = bool(model.messages) or model.expire_time > now  # clearing twice changes nothing
            model.messages = []
            model.expire_time = min(model.expire_time, now)
            session = self.succeeds(result)
            if changed:
                self.expect(model, session, "cleared")
            self.check_session(model, session, changed=changed)

    @rule(name=st.sampled_from(NAMES), history=histories)
    def restore(self, name: str, history: list[tuple[str | None, str]]) -> None:
        model = self.sessions[name]
        result = self.attempt(
            lambda: self.client.restore_session(
                session_id=self.sid(name), messages=[text_message(t, i) for i, t in history]
            )
        )
        if model is None:
            self.fails(result, errors.NotFound, "SESSION_NOT_FOUND")
            return
        if model.ended:
            self.fails(result, errors.FailedPrecondition, "SESSION_ENDED")
            return
        response = self.succeeds(result)
        now = self.now
        if model.status(now) == ACTIVE:
            assert not response.restored
            self.check_session(model, response.session, changed=False)
            return
        assert response.restored
        model.messages = model.number(history)  # a new life: the cap counts from now
        model.max_expire_time = now + model.max_duration
        model.expire_time = min(now + model.timeout, model.max_expire_time)
        self.expect(model, response.session, "restored", message_count=len(history))
        self.check_session(model, response.session, changed=True)

    @rule(
        name=st.sampled_from(NAMES),
        value=st.sampled_from(["a", "b", "ü"]),
        stale=st.booleans(),
        data=st.data(),
    )
    def update_metadata(self, name: str, value: str, stale: bool, data: st.DataObject) -> None:
        model = self.sessions[name]
        old = sorted((model.etags - {model.etag}) | self.retired[name]) if model is not None else []
        stale = stale and bool(old)
        etag = data.draw(st.sampled_from(old)) if stale else model.etag if model is not None else ""
        result = self.attempt(
            lambda: self.client.update_session(session_id=self.sid(name), metadata={"k": value}, etag=etag)
        )
        if model is None:
            self.fails(result, errors.NotFound, "SESSION_NOT_FOUND")
            return
        reason = model.closed_reason(self.now)
        if stale and reason:  # both apply: the contract does not say which one wins
            self.fails(result, (errors.Aborted, errors.FailedPrecondition), "ETAG_MISMATCH", reason)
        elif stale:
            err = self.fails(result, errors.Aborted, "ETAG_MISMATCH")
            assert err.metadata.get("etag") == model.etag, err.metadata
        elif reason:
            self.fails(result, errors.FailedPrecondition, reason)
        else:
            model.metadata = {"k": value}
            session = self.succeeds(result)
            self.expect(model, session, "updated", paths=["metadata"])
            self.check_session(model, session, changed=True)

    # --- messages -----------------------------------------------------------------------------------------

    def append(self, name: str, batch: list[tuple[str | None, str]]) -> None:
        model = self.sessions[name]
        result = self.attempt(
            lambda: self.client.append_messages(
                session_id=self.sid(name), messages=[text_message(t, i) for i, t in batch]
            )
        )
        if model is None:
            self.fails(result, errors.NotFound, "SESSION_NOT_FOUND")
            return
        held = {m.message_id: m for m in model.messages if m.message_id in CALLER_IDS}
        existing = [held[i] for i, _ in batch if i is not None and i in held]
        fresh = [(i, t) for i, t in batch if i is None or i not in held]
        now = self.now
        if not fresh:
            # A retry of an append that landed: answered as stored, whatever the status; not activity.
            response = self.succeeds(result)
            got = [(m.sequence, m.message_id, m.parts[0].text.text) for m in response.messages]
            assert got == [
                (m.sequence, m.message_id, m.text) for m in sorted(existing, key=lambda m: m.sequence)
            ]
            self.check_session(model, response.session, changed=False)
            return
        if reason := model.closed_reason(now):
            self.fails(result, errors.FailedPrecondition, reason)
            return
        response = self.succeeds(result)
        stored = model.number(fresh)
        model.messages += stored
        if model.auto_renew:
            model.extend(now)
        expected = sorted([*existing, *stored], key=lambda m: m.sequence)
        assert [(m.sequence, m.parts[0].text.text) for m in response.messages] == [
            (m.sequence, m.text) for m in expected
        ], (response.messages, expected)
        for want, message in zip(expected, response.messages, strict=True):
            if want.message_id:
                assert message.message_id == want.message_id
            else:
                want.message_id = message.message_id
        appended = {"first_sequence": stored[0].sequence, "last_sequence": stored[-1].sequence}
        self.expect(model, response.session, "messages_appended", **appended)
        self.check_session(model, response.session, changed=True)
        if all(i is not None for i, _ in batch):
            model.acknowledged.append(batch)

    @rule(name=st.sampled_from(NAMES), batch=batches)
    def append_messages(self, name: str, batch: list[tuple[str | None, str]]) -> None:
        self.append(name, batch)

    @rule(name=st.sampled_from(NAMES), message_id=optional_ids, text=texts)
    def append_one(self, name: str, message_id: str | None, text: str) -> None:
        self.append(name, [(message_id, text)])  # a second rule: appends are drawn twice as often

    @precondition(lambda self: any(m is not None and m.acknowledged for m in self.sessions.values()))
    @rule(data=st.data(), new_texts=st.booleans())
    def retry_append(self, data: st.DataObject, new_texts: bool) -> None:
        """Sends an acknowledged append again, as a client that lost the answer would (maybe with other
        texts: the stored messages come back as they were stored)."""
        name = data.draw(
            st.sampled_from([n for n, m in self.sessions.items() if m is not None and m.acknowledged])
        )
        model = self.sessions[name]
        assert model is not None
        batch = data.draw(st.sampled_from(model.acknowledged))
        if new_texts:
            batch = [(i, f"{t} (retry)") for i, t in batch]
        self.append(name, batch)

    @rule(name=st.sampled_from(NAMES), batch=batches, twice=st.booleans())
    def append_refused(self, name: str, batch: list[tuple[str | None, str]], twice: bool) -> None:
        """A batch naming one caller id twice is refused whole (INVALID_ARGUMENT), whatever the session's
        state; a batch for a session that never existed is SESSION_NOT_FOUND."""
        messages = [text_message(t, i) for i, t in batch]
        session_id = self.sid(name) if twice else f"{self.example}/ghost"
        if twice:
            messages += [text_message("again", "m0"), text_message("and again", "m0")]
        result = self.attempt(lambda: self.client.append_messages(session_id=session_id, messages=messages))
        if twice:
            self.fails(result, errors.InvalidArgument, "INVALID_ARGUMENT")
        else:
            self.fails(result, errors.NotFound, "SESSION_NOT_FOUND")

    @rule(name=st.sampled_from(NAMES), data=st.data())
    def delete_message(self, name: str, data: st.DataObject) -> None:
        model = self.sessions[name]
        stored = [m.message_id for m in model.messages] if model is not None else []
        choices = st.sampled_from(CALLER_IDS)  # held or not
        message_id = data.draw(st.one_of(st.sampled_from(stored), choices) if stored else choices)
        result = self.attempt(
            lambda: self.client.delete_messages(session_id=self.sid(name), message_id=message_id)
        )
        if model is None:
            self.fails(result, errors.NotFound, "SESSION_NOT_FOUND")
        elif reason := model.closed_reason(self.now):
            self.fails(result, errors.FailedPrecondition, reason)
        elif message_id not in stored:
            err = self.fails(result, errors.NotFound, "MESSAGE_NOT_FOUND")
            assert err.metadata.get("message_id") == message_id
        else:
            response = self.succeeds(result)
            assert response.deleted_count == 1
            model.messages = [m for m in model.messages if m.message_id != message_id]
            self.expect(
                model, response.session, "messages_deleted", message_ids=[message_id], after_sequence=0
            )
            self.check_session(model, response.session, changed=True)

    @rule(name=st.sampled_from(NAMES), data=st.data())
    def delete_after(self, name: str, data: st.DataObject) -> None:
        model = self.sessions[name]
        after = data.draw(st.integers(0, (model.last_sequence if model is not None else 0) + 1))
        result = self.attempt(
            lambda: self.client.delete_messages(session_id=self.sid(name), after_sequence=after)
        )
        if model is None:
            self.fails(result, errors.NotFound, "SESSION_NOT_FOUND")
        elif reason := model.closed_reason(self.now):
            self.fails(result, errors.FailedPrecondition, reason)
        else:
            response = self.succeeds(result)
            kept = [m for m in model.messages if m.sequence <= after]
            assert response.deleted_count == len(model.messages) - len(kept)
            changed = len(kept) != len(model.messages)
            deleted = sorted(m.message_id for m in model.messages if m.sequence > after)
            model.messages = kept
            if changed:
                self.expect(
                    model, response.session, "messages_deleted", message_ids=deleted, after_sequence=after
                )
            self.check_session(model, response.session, changed=changed)

    @rule(
        name=st.sampled_from(NAMES),
        page_size=st.integers(1, 4),
        descending=st.booleans(),
        include_session=st.booleans(),
    )
    def list_messages(self, name: str, page_size: int, descending: bool, include_session: bool) -> None:
        model = self.sessions[name]
        order = MessageOrder.MESSAGE_ORDER_DESCENDING if descending else MessageOrder.MESSAGE_ORDER_ASCENDING

        def pages() -> list[Any]:
            pager = self.client.list_messages(
                session_id=self.sid(name), page_size=page_size, order=order, include_session=include_session
            )
            return list(pager.pages)

        result = self.attempt(pages)
        if model is None:
            self.fails(result, errors.NotFound, "SESSION_NOT_FOUND")
            return
        got: list[Message] = []
        for page in self.succeeds(result):
            assert 0 < len(page.messages) <= page_size or not model.messages, page
            got += page.messages
            if include_session:
                self.check_session(model, page.session, changed=False)
        self.check_messages(model, got[::-1] if descending else got)

    # --- events -------------------------------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES), ahead=st.booleans())
    def replay_log(self, name: str, ahead: bool) -> None:
        """WatchSession from 0 replays the whole log: the events seen so far, in order, as stored (the
        appended messages as the session now holds them). A watch from an id the session never issued is
        refused, whatever it issued before under its name."""
        model = self.sessions[name]
        if model is None:
            self.missing(
                name, lambda: next(self.client.watch_session(session_id=self.sid(name), resume=False))
            )
            return
        assert not model.pending  # the invariant read them after the last step
        if ahead:
            after = model.last_event_id + 1
            watch = self.client.watch_session(session_id=self.sid(name), after_event_id=after, resume=False)
            self.fails(self.attempt(lambda: next(watch)), errors.OutOfRange, "EVENT_ID_AHEAD")
            return
        replayed = self.read_events(model, 0, model.last_event_id)
        assert [without_messages(e) for e in replayed] == [without_messages(e) for e in model.log]
        for event in replayed:
            self.check_appended(model, event)

    # --- time ---------------------------------------------------------------------------------------------

    @rule(delta=advances)
    def advance_clock(self, delta: timedelta) -> None:
        self.clock.advance(delta)

    @rule(name=st.sampled_from(NAMES), just_before=st.booleans())
    def advance_to_expiry(self, name: str, just_before: bool) -> None:
        """To the very edge: the last microsecond of a session's life, or its first expired one."""
        model = self.sessions[name]
        if model is None:
            return
        when = model.expire_time - US if just_before else model.expire_time
        if when > self.now:
            self.clock.set(when)

    # --- after every step ---------------------------------------------------------------------------------

    @invariant()
    def every_session_reads_back_as_modelled(self) -> None:
        for name, model in self.sessions.items():
            if model is None:
                self.missing(name, lambda n=name: self.client.get_session(session_id=self.sid(n)))
                continue
            pager = self.client.list_messages(session_id=self.sid(name), page_size=1000, include_session=True)
            page = pager.first_page
            assert not page.next_page_token
            self.check_session(model, page.session, changed=False)
            self.check_messages(model, list(page.messages))
            assert page.session.message_count == len(page.messages)
            self.check_events(model)


SETTINGS = settings(
    max_examples=40,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,  # the same sequences on every run: CI is repeatable
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def machine_for(client: SessionsClient, clock: ManualClock, prefix: str) -> type[SessionsMachine]:
    return type("Sessions", (SessionsMachine,), {"client": client, "clock": clock, "prefix": prefix})


@pytest.mark.timeout(600)  # a passing run takes seconds; a failing one needs time to shrink its example
async def test_no_sequence_of_requests_corrupts_a_session_or_drops_a_message(
    target: str, clock: ManualClock, unique: str
) -> None:
    with SessionsClient(target) as client:
        machine = machine_for(client, clock, unique)
        await asyncio.to_thread(run_state_machine_as_test, machine, settings=SETTINGS)
