"""SQLAlchemy Core tables. Alembic migrations own the schema; these definitions must match them
(`tests/test_migrations.py` checks that they do)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


def sqlite_time(value: datetime) -> int:
    """How SQLite stores an aware datetime: integer microseconds since the Unix epoch."""
    if value.tzinfo is None:
        raise ValueError("naive datetime given to the store")
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes, stored per dialect: timestamptz on PostgreSQL; on SQLite, integer microseconds
    since the Unix epoch (exact, ordered, indexable, and far cheaper to read and write than SQLite's text
    timestamps, which a profile of the append path showed as a leading cost)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | int | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return sqlite_time(value)
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, int):
            return _EPOCH + timedelta(microseconds=value)
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# An auto-incrementing 64-bit key that SQLite treats as its rowid.
PK = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

sessions = Table(
    "sessions",
    metadata,
    # Internal key: insertion order, the keyset cursor of ListSessions and the target of foreign keys.
    Column("pk", PK, primary_key=True, autoincrement=True),
    Column("session_id", String(256), nullable=False, unique=True),
    Column("agent_id", String(64), nullable=False),
    Column("user_id", String(256), nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("variables", JSON, nullable=False),
    Column("policy", JSON, nullable=False),  # {"session": {...}, "agent": {...}}: the two tiers as resolved
    Column("timeout_minutes", Integer, nullable=False),
    Column("auto_renew", Boolean, nullable=False),
    Column("max_duration_minutes", Integer, nullable=False),
    Column("warning_threshold_minutes", Integer, nullable=False),
    Column("create_time", UTCDateTime, nullable=False),
    Column("update_time", UTCDateTime, nullable=False),
    Column("last_activity_time", UTCDateTime, nullable=False),
    Column("start_time", UTCDateTime, nullable=False),
    Column("anchor_time", UTCDateTime, nullable=False),
    Column("expire_time", UTCDateTime, nullable=False),
    Column("max_expire_time", UTCDateTime, nullable=False),
    # expire_time minus the warning threshold: when the session turns near_expiration.
    Column("warn_time", UTCDateTime, nullable=False),
    Column("end_time", UTCDateTime, nullable=True),
    Column("renewal_count", Integer, nullable=False),
    Column("message_count", BigInteger, nullable=False),
    Column("last_sequence", BigInteger, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("request_id", String(128), nullable=True, unique=True),
    # Drawn at random at creation, part of the etag's identity: SQLite gives a session created right after
    # the deletion of the newest one the same pk, so (pk, create_time) alone named both at the same instant.
    # NULL for sessions created before migration 0006, whose etags stay as they were.
    Column("incarnation", BigInteger, nullable=True),
    # Highest event id stored for this session (events are numbered per session, from 1).
    Column("last_event_id", BigInteger, nullable=False, server_default="0"),
    # The expire_time a warning / an expiry event was pushed for: one of each per expiry window.
    Column("warned_expire_time", UTCDateTime, nullable=True),
    Column("notified_expire_time", UTCDateTime, nullable=True),
    # When the sweeper next has something to push for this session (warning or expiry); NULL: nothing.
    Column("next_notify_time", UTCDateTime, nullable=True),
    Index(None, "agent_id", "pk"),
    Index(None, "user_id", "pk"),
    Index(None, "expire_time", "pk"),
    Index(None, "warn_time"),
    # The sweeper walks these by keyset (time, pk).
    Index(None, "next_notify_time", "pk"),
    Index(None, "end_time", "pk"),
)

# The durable event log of each session: what WatchSession replays. `payload` is a serialized
# agentsessions.v1.SessionEvent, opaque to the store.
session_events = Table(
    "session_events",
    metadata,
    Column("session_pk", PK, ForeignKey("sessions.pk", ondelete="CASCADE"), primary_key=True),
    Column("event_id", BigInteger, primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("time", UTCDateTime, nullable=False),
    Column("payload", LargeBinary, nullable=False),
)

# One row per metadata pair, so ListSessions can filter on metadata through an index.
session_labels = Table(
    "session_labels",
    metadata,
    Column("session_pk", PK, ForeignKey("sessions.pk", ondelete="CASCADE"), primary_key=True),
    Column("key", String(128), primary_key=True),
    Column("value", String(1024), nullable=False),
    Index(None, "key", "value", "session_pk"),
)

messages = Table(
    "messages",
    metadata,
    Column("session_pk", PK, ForeignKey("sessions.pk", ondelete="CASCADE"), primary_key=True),
    Column("sequence", BigInteger, primary_key=True),
    Column("message_id", String(128), nullable=False),
    Column("role", SmallInteger, nullable=False),
    Column("content", LargeBinary, nullable=False),  # serialized agentsessions.v1 parts, opaque here
    Column("hidden", Boolean, nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("status", SmallInteger, nullable=False),
    Column("turn_id", String(64), nullable=False),
    Column("create_time", UTCDateTime, nullable=False),
    Column("group_start", BigInteger, nullable=False),
    Column("group_end", BigInteger, nullable=False),
    UniqueConstraint("session_pk", "message_id"),
    # The UI view walks visible messages only.
    Index(
        "ix_messages_visible",
        "session_pk",
        "sequence",
        sqlite_where=text("hidden = 0"),
        postgresql_where=text("hidden = false"),
    ),
)

# Where each tool call of a session was made, so a result can be tied to its call when appended.
tool_calls = Table(
    "tool_calls",
    metadata,
    Column("session_pk", PK, ForeignKey("sessions.pk", ondelete="CASCADE"), primary_key=True),
    Column("call_id", String(128), primary_key=True),
    Column("sequence", BigInteger, nullable=False),
)

agents = Table(
    "agents",
    metadata,
    Column("agent_id", String(64), primary_key=True),
    Column("display_name", String(256), nullable=False),
    Column("backend", JSON, nullable=False),
    Column("timeout_defaults", JSON, nullable=False),
    Column("history_window", Integer, nullable=False),
    Column("origin", SmallInteger, nullable=False),
    Column("create_time", UTCDateTime, nullable=False),
    Column("update_time", UTCDateTime, nullable=False),
    Column("version", BigInteger, nullable=False),
)

# Agent turns, and the lease that makes one turn per session run at a time across processes: a running
# turn (state 1) is owned by one process until `lease_expire_time`, which the owner keeps pushing forward;
# the partial unique index allows one running turn per session, and a lease that ran out may be taken
# over (its owner crashed). `stop_mode` is how a stop reaches the owner from another replica.
turns = Table(
    "turns",
    metadata,
    Column("pk", PK, primary_key=True, autoincrement=True),
    Column("turn_id", String(64), nullable=False, unique=True),
    Column("session_pk", PK, ForeignKey("sessions.pk", ondelete="CASCADE"), nullable=False),
    Column("request_id", String(128), nullable=True),
    Column("kind", SmallInteger, nullable=False),
    Column("state", SmallInteger, nullable=False),
    Column("owner", String(64), nullable=False),
    Column("lease_expire_time", UTCDateTime, nullable=False),
    Column("stop_mode", SmallInteger, nullable=False),
    Column("start_sequence", BigInteger, nullable=False),
    Column("continues_turn_id", String(64), nullable=True),
    Column("closed_by_turn_id", String(64), nullable=True),
    Column("pending_calls", JSON, nullable=False),
    Column("finish_reason", SmallInteger, nullable=True),
    # The turn's events for replays to a retried request (deltas coalesced), written when it finishes.
    Column("events", LargeBinary, nullable=True),
    Column("create_time", UTCDateTime, nullable=False),
    Column("finish_time", UTCDateTime, nullable=True),
    # A retried Execute finds its turn by (session, request id).
    UniqueConstraint("session_pk", "request_id"),
    Index(
        "ix_turns_running",
        "session_pk",
        unique=True,
        sqlite_where=text("state = 1"),
        postgresql_where=text("state = 1"),
    ),
    # Lease renewal: the running turns of one owner.
    Index(
        "ix_turns_owner_running",
        "owner",
        sqlite_where=text("state = 1"),
        postgresql_where=text("state = 1"),
    ),
    # Paused turns of a session (closed when a later turn starts).
    Index(
        "ix_turns_paused",
        "session_pk",
        sqlite_where=text("finish_reason = 2 AND closed_by_turn_id IS NULL"),
        postgresql_where=text("finish_reason = 2 AND closed_by_turn_id IS NULL"),
    ),
)

# Variables shared by sessions (domain.state): scope 1 is an agent's (`app:` keys, user_id ''), scope 2 one
# user's of an agent (`user:` keys). One row per scope holding a JSON object, read by primary key.
scoped_variables = Table(
    "scoped_variables",
    metadata,
    Column("scope", SmallInteger, primary_key=True),
    Column("agent_id", String(64), primary_key=True),
    Column("user_id", String(256), primary_key=True),
    Column("variables", JSON, nullable=False),
    Column("update_time", UTCDateTime, nullable=False),
)
