"""scoped variables: `app:` and `user:` state shared by an agent's sessions and by a user's

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import sessiond.store.tables

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UTC_TIME = sessiond.store.tables.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "scoped_variables",
        sa.Column("scope", sa.SmallInteger(), nullable=False),
        sa.Column("agent_id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=256), nullable=False),
        sa.Column("variables", sa.JSON(), nullable=False),
        sa.Column("update_time", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("scope", "agent_id", "user_id", name=op.f("pk_scoped_variables")),
    )


def downgrade() -> None:
    op.drop_table("scoped_variables")
