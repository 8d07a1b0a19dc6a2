"""refunds remember when a person last acted on them (issue 14 review)

A refund an operator sent again out of manual review is older than the escalation's day by
then; measured from `created_at` alone, the next retry run escalated it straight back. The
escalation now counts from the later of `created_at` and `reviewed_at`.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("refunds") as batch:
        batch.add_column(sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("refunds") as batch:
        batch.drop_column("reviewed_at")
