"""turns: turn records and the per-session turn lease

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import sessiond.store.tables

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UTC_TIME = sessiond.store.tables.UTCDateTime(timezone=True)
PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
PAUSED = "finish_reason = 2 AND closed_by_turn_id IS NULL"


def upgrade() -> None:
    op.create_table(
        "turns",
        sa.Column("pk", PK, autoincrement=True, nullable=False),
        sa.Column("turn_id", sa.String(length=64), nullable=False),
        sa.Column("session_pk", PK, nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column("kind", sa.SmallInteger(), nullable=False),
        sa.Column("state", sa.SmallInteger(), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("lease_expire_time", UTC_TIME, nullable=False),
        sa.Column("stop_mode", sa.SmallInteger(), nullable=False),
        sa.Column("start_sequence", sa.BigInteger(), nullable=False),
        sa.Column("continues_turn_id", sa.String(length=64), nullable=True),
        sa.Column("closed_by_turn_id", sa.String(length=64), nullable=True),
        sa.Column("pending_calls", sa.JSON(), nullable=False),
        sa.Column("finish_reason", sa.SmallInteger(), nullable=True),
        sa.Column("events", sa.LargeBinary(), nullable=True),
        sa.Column("create_time", UTC_TIME, nullable=False),
        sa.Column("finish_time", UTC_TIME, nullable=True),
        sa.ForeignKeyConstraint(
            ["session_pk"], ["sessions.pk"], name=op.f("fk_turns_session_pk_sessions"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_turns")),
        sa.UniqueConstraint("session_pk", "request_id", name=op.f("uq_turns_session_pk_request_id")),
        sa.UniqueConstraint("turn_id", name=op.f("uq_turns_turn_id")),
    )
    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.create_index(
            "ix_turns_running",
            ["session_pk"],
            unique=True,
            sqlite_where=sa.text("state = 1"),
            postgresql_where=sa.text("state = 1"),
        )
        batch_op.create_index(
            "ix_turns_owner_running",
            ["owner"],
            unique=False,
            sqlite_where=sa.text("state = 1"),
            postgresql_where=sa.text("state = 1"),
        )
        batch_op.create_index(
            "ix_turns_paused",
            ["session_pk"],
            unique=False,
            sqlite_where=sa.text(PAUSED),
            postgresql_where=sa.text(PAUSED),
        )


def downgrade() -> None:
    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.drop_index("ix_turns_paused")
        batch_op.drop_index("ix_turns_owner_running")
        batch_op.drop_index("ix_turns_running")
    op.drop_table("turns")
