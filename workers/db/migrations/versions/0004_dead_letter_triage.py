"""dead-letter triage and replay history (issue 4, DLQ)

dead_letters learns which rule triaged it, how many replays it has had and why it was closed;
dead_letter_events keeps every triage decision, replay, edit and discard with actor, reason and
time.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("dead_letters") as batch:
        batch.add_column(sa.Column("replays", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("rule", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("resolution", sa.Text(), nullable=True))
        batch.add_column(sa.Column("last_replayed_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index(
            "ix_dead_letters_new",
            ["id"],
            postgresql_where=sa.text("status = 'NEW'"),
            sqlite_where=sa.text("status = 'NEW'"),
        )
    op.create_table(
        "dead_letter_events",
        sa.Column("id", ID, nullable=False),
        sa.Column("dead_letter_id", ID, nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column(
            "detail",
            sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
            server_default=sa.text("'{}'"),
            nullable=False,
        ),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["dead_letter_id"],
            ["dead_letters.id"],
            name=op.f("fk_dead_letter_events_dead_letter_id_dead_letters"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letter_events")),
    )
    op.create_index(
        "ix_dead_letter_events_dead_letter_id", "dead_letter_events", ["dead_letter_id", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_dead_letter_events_dead_letter_id", table_name="dead_letter_events")
    op.drop_table("dead_letter_events")
    with op.batch_alter_table("dead_letters") as batch:
        batch.drop_index("ix_dead_letters_new")
        batch.drop_column("last_replayed_at")
        batch.drop_column("resolution")
        batch.drop_column("rule")
        batch.drop_column("replays")
