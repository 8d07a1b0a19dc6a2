"""operator console (issue 14): refunds a person resolved, reconciliation findings reviewed,
scheduled runs an operator asked for

refunds learn when a person resolved their manual review and how (the retry job and the
escalation never take a resolved refund again); reconciliation discrepancies get a status an
operator moves (OPEN -> ACKNOWLEDGED -> RESOLVED) through the audited transition helper, with
when it last changed; a job run says who asked for it when a person did (run now); and
three indexes for the overview's charts and the lists' counts.

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
    with op.batch_alter_table("refunds") as batch:
        batch.add_column(sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("resolution", sa.Text(), nullable=True))
    with op.batch_alter_table("reconciliation_discrepancies") as batch:
        batch.add_column(
            sa.Column("status", sa.String(length=16), server_default="OPEN", nullable=False)
        )
        batch.add_column(
            sa.Column(
                "updated_at",
                sa.DateTime(timezone=True),
                server_default=sa.func.now(),
                nullable=False,
            )
        )
        batch.create_check_constraint(
            op.f("ck_reconciliation_discrepancies_status"),
            "status IN ('OPEN', 'ACKNOWLEDGED', 'RESOLVED')",
        )
        batch.create_index("ix_reconciliation_discrepancies_run_id_status", ["run_id", "status"])
    with op.batch_alter_table("job_runs") as batch:
        batch.add_column(sa.Column("requested_by", sa.String(length=128), nullable=True))
    # The overview's charts read an entity's changes, and the letters opened, by time; the
    # lists count letters by task and error: each from an index alone.
    op.create_index(
        "ix_state_transitions_entity_at",
        "state_transitions",
        ["entity", "at"],
        postgresql_include=["to_status"],
    )
    op.create_index("ix_dead_letters_created_at", "dead_letters", ["created_at"])
    op.create_index(
        "ix_dead_letters_groups",
        "dead_letters",
        ["status", "task_name", "error_type", "classification", "created_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_dead_letters_groups", table_name="dead_letters")
    op.drop_index("ix_dead_letters_created_at", table_name="dead_letters")
    op.drop_index("ix_state_transitions_entity_at", table_name="state_transitions")
    with op.batch_alter_table("job_runs") as batch:
        batch.drop_column("requested_by")
    with op.batch_alter_table("reconciliation_discrepancies") as batch:
        batch.drop_index("ix_reconciliation_discrepancies_run_id_status")
        batch.drop_constraint(op.f("ck_reconciliation_discrepancies_status"), type_="check")
        batch.drop_column("updated_at")
        batch.drop_column("status")
    with op.batch_alter_table("refunds") as batch:
        batch.drop_column("resolution")
        batch.drop_column("resolved_at")
