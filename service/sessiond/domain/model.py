"""The session and message as the service sees them, and the rules of a session's life.

Every rule takes `now`; nothing here reads a clock, a database or the network.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta
from hashlib import blake2b
from typing import Any

from .errors import FailedPrecondition
from .policy import EffectivePolicy, TimeoutPolicy, next_expiry
from .state import Scope

ZERO = timedelta(0)


def row_etag(version: int, *identity: object) -> str:
    """An etag (AIP-154) for one row at one version: `v7.` and a digest of what makes the row itself, so a
    version of another row, or of a row deleted and created again under the same name, is not taken."""
    return f"v{version}.{_identity_digest(identity)}"


@functools.lru_cache(maxsize=16_384)
def _identity_digest(identity: tuple[object, ...]) -> str:
    # Cached: a row's identity never changes, and every session sent out carries its etag.
    return blake2b(repr(identity).encode(), digest_size=4).hexdigest()


class Status(enum.IntEnum):
    """Values match agentsessions.v1.SessionStatus."""

    ACTIVE = 1
    EXPIRED = 2
    ENDED = 3


class Role(enum.IntEnum):
    """Values match agentsessions.v1.Role."""

    USER = 1
    ASSISTANT = 2
    SYSTEM = 3
    TOOL = 4


class MessageStatus(enum.IntEnum):
    """Values match agentsessions.v1.MessageStatus."""

    COMPLETE = 1
    INTERRUPTED = 2
    ERROR = 3


@dataclass(frozen=True)
class Session:
    pk: int
    session_id: str
    agent_id: str
    user_id: str
    metadata: dict[str, str]
    variables: dict[str, Any]
    policy: TimeoutPolicy  # the session tier, as the caller set it
    agent_policy: TimeoutPolicy  # the agent tier, as it was when the policy was last resolved
    effective: EffectivePolicy
    create_time: datetime
    update_time: datetime
    last_activity_time: datetime
    start_time: datetime  # start of the current life: creation, or the last restore
    anchor_time: datetime  # the last renewal (or the start): expiry counts from here
    expire_time: datetime
    max_expire_time: datetime
    end_time: datetime | None
    renewal_count: int
    message_count: int
    last_sequence: int
    version: int
    request_id: str | None = None
    last_event_id: int = 0
    # The expire_time a warning / an expiry event was pushed for: at most one of each per expiry window.
    warned_expire_time: datetime | None = None
    notified_expire_time: datetime | None = None
    # The `user:` and `app:` variables (domain.state), loaded only by the reads that show them merged.
    shared: Mapping[Scope, Mapping[str, Any]] = field(default_factory=dict)
    # A random number drawn at creation (None for sessions stored before it existed): tells this session
    # from one deleted before it under its name, which on SQLite may have had the same pk and create time.
    incarnation: int | None = None

    @property
    def etag(self) -> str:
        if self.incarnation is None:
            return row_etag(self.version, self.pk, self.create_time.timestamp())
        return row_etag(self.version, self.pk, self.create_time.timestamp(), self.incarnation)

    def evolve(self, **changes: Any) -> Session:
        """`dataclasses.replace` for the hot paths: a copy of the instance dict instead of `__init__` run
        field by field through frozen `__setattr__` (3 µs against 17 µs on the bench machine; an append
        makes four). Session has no `__post_init__` and no slots, so the two are the same; unknown field
        names are refused as `replace` refuses them."""
        if not changes.keys() <= _SESSION_FIELDS:
            raise TypeError(f"Session has no field(s) {sorted(changes.keys() - _SESSION_FIELDS)}")
        new = object.__new__(Session)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new

    def status(self, now: datetime) -> Status:
        if self.end_time is not None:
            return Status.ENDED
        if now >= self.expire_time:
            return Status.EXPIRED
        return Status.ACTIVE

    def time_remaining(self, now: datetime) -> timedelta:
        if self.status(now) is not Status.ACTIVE:
            return ZERO
        return self.expire_time - now

    def near_expiration(self, now: datetime) -> bool:
        return self.status(now) is Status.ACTIVE and self.expire_time - now < self.effective.warning_threshold

    @property
    def warn_time(self) -> datetime:
        """From this instant on, less than the warning threshold is left (near_expiration once past it)."""
        return self.expire_time - self.effective.warning_threshold

    @property
    def next_notify_time(self) -> datetime | None:
        """When the sweeper next has an event to push: the warning, then the expiry, once per window."""
        if self.end_time is not None:
            return None
        if self.warned_expire_time != self.expire_time and self.notified_expire_time != self.expire_time:
            return self.warn_time
        if self.notified_expire_time != self.expire_time:
            # The sweep takes what is due strictly before now (as the warning is, `near_expiration`),
            # and a session is expired from its expire_time on (`status`): one tick earlier.
            return self.expire_time - _TICK
        return None


_SESSION_FIELDS = frozenset(f.name for f in fields(Session))
_TICK = timedelta(microseconds=1)  # datetime's resolution


class Notice(enum.Enum):
    EXPIRING_SOON = "expiring_soon"
    EXPIRED = "expired"


def due_notice(session: Session, now: datetime) -> tuple[Session, Notice | None]:
    """What the sweeper pushes for a session now, and the session marked as having pushed it. An expired
    session gets the expiry only (a warning after the fact helps nobody)."""
    status = session.status(now)
    if status is Status.EXPIRED and session.notified_expire_time != session.expire_time:
        return session.evolve(notified_expire_time=session.expire_time), Notice.EXPIRED
    if (
        status is Status.ACTIVE
        and now > session.warn_time
        and session.warned_expire_time != session.expire_time
    ):
        return session.evolve(warned_expire_time=session.expire_time), Notice.EXPIRING_SOON
    return session, None


def ensure_writable(session: Session, now: datetime) -> None:
    """Writes go to ACTIVE sessions only; expired and ended ones stay readable."""
    status = session.status(now)
    if status is Status.ENDED:
        raise FailedPrecondition(
            f"session {session.session_id!r} has ended and is read-only",
            reason="SESSION_ENDED",
            metadata={"session_id": session.session_id},
        )
    if status is Status.EXPIRED:
        raise FailedPrecondition(
            f"session {session.session_id!r} expired at {session.expire_time.isoformat()}",
            reason="SESSION_EXPIRED",
            metadata={"session_id": session.session_id, "expire_time": session.expire_time.isoformat()},
        )


def new_session(
    *,
    session_id: str,
    agent_id: str,
    user_id: str,
    metadata: dict[str, str],
    variables: dict[str, Any],
    policy: TimeoutPolicy,
    agent_policy: TimeoutPolicy,
    effective: EffectivePolicy,
    request_id: str | None,
    now: datetime,
    incarnation: int,
) -> Session:
    cap = now + effective.max_duration
    return Session(
        pk=0,
        session_id=session_id,
        agent_id=agent_id,
        user_id=user_id,
        metadata=metadata,
        variables=variables,
        policy=policy,
        agent_policy=agent_policy,
        effective=effective,
        create_time=now,
        update_time=now,
        last_activity_time=now,
        start_time=now,
        anchor_time=now,
        expire_time=next_expiry(now, effective, cap),
        max_expire_time=cap,
        end_time=None,
        renewal_count=0,
        message_count=0,
        last_sequence=0,
        version=1,
        request_id=request_id,
        incarnation=incarnation,
    )


def _extension(session: Session, now: datetime) -> dict[str, Any]:
    """The fields a renewal at `now` changes: none when the cap leaves nothing to extend."""
    expire = next_expiry(now, session.effective, session.max_expire_time)
    if expire <= session.expire_time:
        return {}
    return {"anchor_time": now, "expire_time": expire, "renewal_count": session.renewal_count + 1}


def record_activity(session: Session, now: datetime, **changes: Any) -> Session:
    """A message, a turn or a heartbeat: renews when auto-renew is on (silently bounded by the cap).
    `changes`: other fields the same write changes, set in the same copy (appends run this for every
    call)."""
    changes.update(last_activity_time=now, update_time=now, version=session.version + 1)
    if session.effective.auto_renew:
        changes.update(_extension(session, now))
    return session.evolve(**changes)


def renew(session: Session, now: datetime) -> Session:
    """A manual renewal: works whatever auto-renew says, fails when the cap leaves nothing to extend."""
    ensure_writable(session, now)
    if session.expire_time >= session.max_expire_time:
        raise FailedPrecondition(
            f"session {session.session_id!r} reached its maximum duration of "
            f"{session.effective.max_duration_minutes} minutes",
            reason="MAX_DURATION_REACHED",
            metadata={
                "session_id": session.session_id,
                "max_duration_minutes": str(session.effective.max_duration_minutes),
                "max_expire_time": session.max_expire_time.isoformat(),
            },
        )
    return session.evolve(**_extension(session, now), update_time=now, version=session.version + 1)


def change_policy(
    session: Session,
    policy: TimeoutPolicy,
    effective: EffectivePolicy,
    now: datetime,
    agent_policy: TimeoutPolicy,
) -> Session:
    """New timeout values apply as if they had always held: the timeout counts from the last activity when
    auto-renew is on and from the last renewal otherwise, the cap from the start of the session's life."""
    cap = session.start_time + effective.max_duration
    anchor = (
        max(session.anchor_time, session.last_activity_time) if effective.auto_renew else session.anchor_time
    )
    return replace(
        session,
        policy=policy,
        agent_policy=agent_policy,
        effective=effective,
        max_expire_time=cap,
        anchor_time=anchor,
        expire_time=next_expiry(anchor, effective, cap),
        update_time=now,
        version=session.version + 1,
    )


def end(session: Session, now: datetime) -> Session:
    if session.end_time is not None:
        return session
    return session.evolve(end_time=now, update_time=now, version=session.version + 1)


def clear(session: Session, now: datetime) -> Session:
    """Empties the history and leaves the session expired. Clearing twice changes nothing more.

    An ended session is read-only, history included (delete it to drop its history)."""
    if session.end_time is not None:
        ensure_writable(session, now)
    if session.message_count == 0 and session.expire_time <= now:
        return session
    return replace(
        session,
        message_count=0,
        expire_time=min(session.expire_time, now),
        update_time=now,
        version=session.version + 1,
    )


def restore(session: Session, message_count: int, now: datetime) -> Session:
    """Starts a new life for an expired session, holding the restored history."""
    if session.end_time is not None:
        ensure_writable(session, now)
    cap = now + session.effective.max_duration
    return replace(
        session,
        start_time=now,
        anchor_time=now,
        last_activity_time=now,
        max_expire_time=cap,
        expire_time=next_expiry(now, session.effective, cap),
        message_count=message_count,
        update_time=now,
        version=session.version + 1,
    )


@dataclass(frozen=True)
class NewMessage:
    """A message to append, validated by the API layer. `content` is opaque to the domain and the store:
    the serialized parts, written and read by the API layer."""

    message_id: str
    role: Role
    content: bytes
    hidden: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    status: MessageStatus = MessageStatus.COMPLETE
    turn_id: str = ""
    tool_call_ids: tuple[str, ...] = ()
    tool_result_ids: tuple[str, ...] = ()
    caller_id: bool = False  # the caller chose message_id: a retry must not store it twice


@dataclass(frozen=True)
class StoredMessage:
    session_id: str
    sequence: int
    message_id: str
    role: Role
    content: bytes
    hidden: bool
    metadata: dict[str, str]
    status: MessageStatus
    turn_id: str
    create_time: datetime
    # A tool call and its results form a group that pages keep whole. group_start: the earliest message
    # holding a call this message answers; group_end: the latest message answering a call this one
    # holds. Both are the message's own sequence when it takes part in no group.
    group_start: int
    group_end: int
