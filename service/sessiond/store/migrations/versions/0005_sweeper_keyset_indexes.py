"""sweeper keyset indexes: (time, pk) for the notice and purge walks

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_CHANGES = (
    ("ix_sessions_expire_time", "ix_sessions_expire_time_pk", "expire_time"),
    ("ix_sessions_next_notify_time", "ix_sessions_next_notify_time_pk", "next_notify_time"),
    ("ix_sessions_end_time", "ix_sessions_end_time_pk", "end_time"),
)


def upgrade() -> None:
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        for old, new, column in _CHANGES:
            batch_op.drop_index(old)
            batch_op.create_index(new, [column, "pk"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        for old, new, column in _CHANGES:
            batch_op.drop_index(new)
            batch_op.create_index(old, [column], unique=False)
