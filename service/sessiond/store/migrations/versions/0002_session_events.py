"""session events: the durable event log, per-session event ids, expiry notification bookkeeping

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import sessiond.store.tables

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UTC_TIME = sessiond.store.tables.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "session_events",
        sa.Column("session_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("time", UTC_TIME, nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_pk"],
            ["sessions.pk"],
            name=op.f("fk_session_events_session_pk_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("session_pk", "event_id", name=op.f("pk_session_events")),
    )
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_event_id", sa.BigInteger(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("warned_expire_time", UTC_TIME, nullable=True))
        batch_op.add_column(sa.Column("notified_expire_time", UTC_TIME, nullable=True))
        batch_op.add_column(sa.Column("next_notify_time", UTC_TIME, nullable=True))
        batch_op.create_index(batch_op.f("ix_sessions_next_notify_time"), ["next_notify_time"], unique=False)
        batch_op.create_index(batch_op.f("ix_sessions_end_time"), ["end_time"], unique=False)
    # Existing sessions: due for the sweeper at their warning time.
    op.execute("UPDATE sessions SET next_notify_time = warn_time WHERE end_time IS NULL")


def downgrade() -> None:
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sessions_end_time"))
        batch_op.drop_index(batch_op.f("ix_sessions_next_notify_time"))
        batch_op.drop_column("next_notify_time")
        batch_op.drop_column("notified_expire_time")
        batch_op.drop_column("warned_expire_time")
        batch_op.drop_column("last_event_id")
    op.drop_table("session_events")
