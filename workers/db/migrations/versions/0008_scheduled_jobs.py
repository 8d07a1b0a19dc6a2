"""scheduled jobs remember when backstop first saw them in its schedule (issue 16)

A job that has never run was measured from the first schedule check ever made, so a job added
by a later release counted as missed at once, and `backstop health` called every job that had
not run yet degraded. A job is now expected from when it was first seen in the schedule
(`backstop db upgrade` and each schedule check record it), and waits out its first window.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "scheduled_jobs",
        sa.Column("job_name", sa.String(length=128), nullable=False),
        sa.Column(
            "first_seen_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("job_name", name=op.f("pk_scheduled_jobs")),
    )


def downgrade() -> None:
    op.drop_table("scheduled_jobs")
