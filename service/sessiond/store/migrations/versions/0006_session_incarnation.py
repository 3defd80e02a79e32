"""session incarnation: a random number per session, part of its etag's identity

SQLite gives a session created right after the deletion of the newest one the same pk; at the same instant
it had the same create time too, so an etag of the deleted session was taken by the new one.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: an added column on both backends, no table rewrite. Existing sessions keep NULL
    # and with it the etags their clients hold.
    op.add_column("sessions", sa.Column("incarnation", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    # Not in batch mode: a batch would rebuild `sessions` on SQLite, and dropping the old table with foreign
    # keys on deletes its children. SQLite drops a column in place (3.35 and later).
    op.drop_column("sessions", "incarnation")
