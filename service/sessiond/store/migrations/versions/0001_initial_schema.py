"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-21 18:52:33.662501
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import sessiond.store.tables

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("agent_id", sa.String(length=64), nullable=False),
        sa.Column("display_name", sa.String(length=256), nullable=False),
        sa.Column("backend", sa.JSON(), nullable=False),
        sa.Column("timeout_defaults", sa.JSON(), nullable=False),
        sa.Column("history_window", sa.Integer(), nullable=False),
        sa.Column("origin", sa.SmallInteger(), nullable=False),
        sa.Column("create_time", sessiond.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("update_time", sessiond.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("agent_id", name=op.f("pk_agents")),
    )
    op.create_table(
        "sessions",
        sa.Column(
            "pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("session_id", sa.String(length=256), nullable=False),
        sa.Column("agent_id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=256), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("variables", sa.JSON(), nullable=False),
        sa.Column("policy", sa.JSON(), nullable=False),
        sa.Column("timeout_minutes", sa.Integer(), nullable=False),
        sa.Column("auto_renew", sa.Boolean(), nullable=False),
        sa.Column("max_duration_minutes", sa.Integer(), nullable=False),
        sa.Column("warning_threshold_minutes", sa.Integer(), nullable=False),
        sa.Column("create_time", sessiond.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("update_time", sessiond.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_activity_time", sessiond.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("start_time", sessiond.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("anchor_time", sessiond.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expire_time", sessiond.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("max_expire_time", sessiond.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("warn_time", sessiond.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("end_time", sessiond.store.tables.UTCDateTime(timezone=True), nullable=True),
        sa.Column("renewal_count", sa.Integer(), nullable=False),
        sa.Column("message_count", sa.BigInteger(), nullable=False),
        sa.Column("last_sequence", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_sessions")),
        sa.UniqueConstraint("request_id", name=op.f("uq_sessions_request_id")),
        sa.UniqueConstraint("session_id", name=op.f("uq_sessions_session_id")),
    )
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sessions_agent_id_pk"), ["agent_id", "pk"], unique=False)
        batch_op.create_index(batch_op.f("ix_sessions_expire_time"), ["expire_time"], unique=False)
        batch_op.create_index(batch_op.f("ix_sessions_user_id_pk"), ["user_id", "pk"], unique=False)
        batch_op.create_index(batch_op.f("ix_sessions_warn_time"), ["warn_time"], unique=False)

    op.create_table(
        "messages",
        sa.Column("session_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("message_id", sa.String(length=128), nullable=False),
        sa.Column("role", sa.SmallInteger(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("hidden", sa.Boolean(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("status", sa.SmallInteger(), nullable=False),
        sa.Column("turn_id", sa.String(length=64), nullable=False),
        sa.Column("create_time", sessiond.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("group_start", sa.BigInteger(), nullable=False),
        sa.Column("group_end", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_pk"], ["sessions.pk"], name=op.f("fk_messages_session_pk_sessions"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("session_pk", "sequence", name=op.f("pk_messages")),
        sa.UniqueConstraint("session_pk", "message_id", name=op.f("uq_messages_session_pk_message_id")),
    )
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.create_index(
            "ix_messages_visible",
            ["session_pk", "sequence"],
            unique=False,
            sqlite_where=sa.text("hidden = 0"),
            postgresql_where=sa.text("hidden = false"),
        )

    op.create_table(
        "session_labels",
        sa.Column("session_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("value", sa.String(length=1024), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_pk"],
            ["sessions.pk"],
            name=op.f("fk_session_labels_session_pk_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("session_pk", "key", name=op.f("pk_session_labels")),
    )
    with op.batch_alter_table("session_labels", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_session_labels_key_value_session_pk"), ["key", "value", "session_pk"], unique=False
        )

    op.create_table(
        "tool_calls",
        sa.Column("session_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("call_id", sa.String(length=128), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_pk"],
            ["sessions.pk"],
            name=op.f("fk_tool_calls_session_pk_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("session_pk", "call_id", name=op.f("pk_tool_calls")),
    )


def downgrade() -> None:
    op.drop_table("tool_calls")
    with op.batch_alter_table("session_labels", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_session_labels_key_value_session_pk"))

    op.drop_table("session_labels")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_messages_visible",
            sqlite_where=sa.text("hidden = 0"),
            postgresql_where=sa.text("hidden = false"),
        )

    op.drop_table("messages")
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sessions_warn_time"))
        batch_op.drop_index(batch_op.f("ix_sessions_user_id_pk"))
        batch_op.drop_index(batch_op.f("ix_sessions_expire_time"))
        batch_op.drop_index(batch_op.f("ix_sessions_agent_id_pk"))

    op.drop_table("sessions")
    op.drop_table("agents")
