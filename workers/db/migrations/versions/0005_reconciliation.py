"""reconciliation progress, the in-flight janitor, webhook events (issue 5)

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
IN_FLIGHT = "status IN ('PENDING', 'AUTHORIZED')"
OPEN_RUN = "status IN ('PENDING', 'RUNNING', 'FAILED')"


def upgrade() -> None:
    with op.batch_alter_table("payments") as batch:
        batch.add_column(sa.Column("last_checked_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("next_check_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("check_attempts", sa.Integer(), server_default="0", nullable=False)
        )
        batch.create_index("ix_payments_gateway_created_at", ["gateway", "created_at", "id"])
        batch.create_index(
            "ix_payments_in_flight",
            ["created_at"],
            postgresql_where=sa.text(IN_FLIGHT),
            sqlite_where=sa.text(IN_FLIGHT),
        )

    with op.batch_alter_table("reconciliation_runs") as batch:
        batch.alter_column(
            "status",
            existing_type=sa.String(length=16),
            existing_nullable=False,
            server_default="PENDING",
        )
        batch.add_column(
            sa.Column(
                "updated_at",
                sa.DateTime(timezone=True),
                server_default=sa.func.now(),
                nullable=False,
            )
        )
        batch.add_column(sa.Column("actor", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("owner", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(
            sa.Column("progress", Json, server_default=sa.text("'{}'"), nullable=False)
        )
        batch.add_column(sa.Column("error", sa.Text(), nullable=True))
        batch.create_check_constraint(
            op.f("ck_reconciliation_runs_status"),
            "status IN ('PENDING', 'RUNNING', 'COMPLETED', 'FAILED')",
        )
        batch.create_index(
            "uq_reconciliation_runs_open",
            ["gateway", "window_start", "window_end"],
            unique=True,
            postgresql_where=sa.text(OPEN_RUN),
            sqlite_where=sa.text(OPEN_RUN),
        )
        batch.create_index(
            "ix_reconciliation_runs_gateway_window", ["gateway", "window_start", "window_end"]
        )

    op.create_table(
        "reconciliation_seen",
        sa.Column("run_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("batch", sa.Integer(), nullable=False),
        sa.Column("payment_ids", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["reconciliation_runs.id"],
            name=op.f("fk_reconciliation_seen_run_id_reconciliation_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "batch", name=op.f("pk_reconciliation_seen")),
    )

    with op.batch_alter_table("reconciliation_discrepancies") as batch:
        batch.add_column(
            sa.Column("fixed", sa.Boolean(), server_default=sa.text("false"), nullable=False)
        )
        batch.create_unique_constraint(
            op.f("uq_reconciliation_discrepancies_run_id_type_gateway_payment_id"),
            ["run_id", "type", "gateway_payment_id"],
        )

    with op.batch_alter_table("webhook_events") as batch:
        batch.add_column(sa.Column("entity_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("outcome", sa.String(length=32), nullable=True))


def downgrade() -> None:
    op.drop_table("reconciliation_seen")

    with op.batch_alter_table("webhook_events") as batch:
        batch.drop_column("outcome")
        batch.drop_column("entity_id")

    with op.batch_alter_table("reconciliation_discrepancies") as batch:
        batch.drop_constraint(
            op.f("uq_reconciliation_discrepancies_run_id_type_gateway_payment_id"), type_="unique"
        )
        batch.drop_column("fixed")

    with op.batch_alter_table("reconciliation_runs") as batch:
        batch.drop_index("ix_reconciliation_runs_gateway_window")
        batch.drop_index(
            "uq_reconciliation_runs_open",
            postgresql_where=sa.text(OPEN_RUN),
            sqlite_where=sa.text(OPEN_RUN),
        )
        batch.drop_constraint(op.f("ck_reconciliation_runs_status"), type_="check")
        for column in ("error", "progress", "attempts", "lease_until", "owner", "actor"):
            batch.drop_column(column)
        batch.drop_column("updated_at")
        batch.alter_column(
            "status",
            existing_type=sa.String(length=16),
            existing_nullable=False,
            server_default="RUNNING",
        )

    with op.batch_alter_table("payments") as batch:
        batch.drop_index(
            "ix_payments_in_flight",
            postgresql_where=sa.text(IN_FLIGHT),
            sqlite_where=sa.text(IN_FLIGHT),
        )
        batch.drop_index("ix_payments_gateway_created_at")
        for column in ("check_attempts", "next_check_at", "last_checked_at"):
            batch.drop_column(column)
