"""refunds: when the current key was first sent, the in-flight lease, the last retry claim

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("refunds") as batch:
        batch.add_column(sa.Column("key_sent_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("in_flight_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("last_retry_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index(
            "ix_refunds_open",
            ["status", "updated_at"],
            postgresql_where=sa.text("NOT requires_manual_review"),
            sqlite_where=sa.text("NOT requires_manual_review"),
        )


def downgrade() -> None:
    with op.batch_alter_table("refunds") as batch:
        batch.drop_index("ix_refunds_open")
        batch.drop_column("last_retry_at")
        batch.drop_column("in_flight_until")
        batch.drop_column("key_sent_at")
