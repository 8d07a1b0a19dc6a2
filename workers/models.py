"""SQLAlchemy models of every shared table in the contract (section 3).

Every column other services rely on has a server-side default where the contract says so, so a
plain SQL INSERT naming only the business columns works from any language.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores it naive, in UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass timezone-aware UTC times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Id = BigInteger().with_variant(Integer, "sqlite")
Json = JSON().with_variant(JSONB(), "postgresql")
NOW = func.now()


def _statuses(*names: str) -> str:
    return "status IN (" + ", ".join(f"'{name}'" for name in names) + ")"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: Json}


class Timestamps:
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)
    updated_at: Mapped[datetime] = mapped_column(server_default=NOW)


HOLD_STATUSES = ("ACTIVE", "CONFIRMED", "EXPIRED", "RELEASED")


class BookingHold(Timestamps, Base):
    __tablename__ = "booking_holds"
    __table_args__ = (
        CheckConstraint(_statuses(*HOLD_STATUSES), name="status"),
        # The sweep reads only due ACTIVE holds; the partial index keeps that read small
        # however many final holds the table accumulates.
        Index(
            "ix_booking_holds_active_expires_at",
            "expires_at",
            postgresql_where=text("status = 'ACTIVE'"),
            sqlite_where=text("status = 'ACTIVE'"),
        ),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    resource_id: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str] = mapped_column(String(128))
    start_time: Mapped[datetime]
    end_time: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(16), server_default="ACTIVE")
    expires_at: Mapped[datetime]
    released_at: Mapped[datetime | None]


PAYMENT_STATUSES = ("PENDING", "AUTHORIZED", "COMPLETED", "FAILED")


class Payment(Timestamps, Base):
    __tablename__ = "payments"
    __table_args__ = (
        CheckConstraint(_statuses(*PAYMENT_STATUSES), name="status"),
        CheckConstraint("amount >= 0", name="amount"),
        CheckConstraint("gateway IN ('razorpay', 'stripe')", name="gateway"),
        # A reconciliation window's payments, walked in (created_at, id) order.
        Index("ix_payments_gateway_created_at", "gateway", "created_at", "id"),
        # The janitor reads only payments still in flight.
        Index(
            "ix_payments_in_flight",
            "created_at",
            postgresql_where=text("status IN ('PENDING', 'AUTHORIZED')"),
            sqlite_where=text("status IN ('PENDING', 'AUTHORIZED')"),
        ),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    gateway: Mapped[str] = mapped_column(String(16))
    gateway_order_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    gateway_payment_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16), server_default="PENDING")
    # The in-flight janitor: when it last asked the gateway about this payment, when it asks
    # next, and how many times it has asked.
    last_checked_at: Mapped[datetime | None]
    next_check_at: Mapped[datetime | None]
    check_attempts: Mapped[int] = mapped_column(Integer, server_default="0")


REFUND_STATUSES = ("PENDING", "PROCESSING", "COMPLETED", "FAILED")


class Refund(Timestamps, Base):
    __tablename__ = "refunds"
    __table_args__ = (
        CheckConstraint(_statuses(*REFUND_STATUSES), name="status"),
        CheckConstraint("amount > 0", name="amount"),
        Index("ix_refunds_status_updated_at", "status", "updated_at"),
        # The retry job reads only refunds that are neither final nor in manual review.
        Index(
            "ix_refunds_open",
            "status",
            "updated_at",
            postgresql_where=text("NOT requires_manual_review"),
            sqlite_where=text("NOT requires_manual_review"),
        ),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    payment_id: Mapped[int] = mapped_column(ForeignKey("payments.id"), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    reason: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), server_default="PENDING")
    idempotency_key: Mapped[str | None] = mapped_column(String(64), unique=True)
    gateway_refund_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    requires_manual_review: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # When the current key was first sent: from then on the outcome may be unknown, and after
    # the gateway's key lifetime the refund is looked up before it is sent again.
    key_sent_at: Mapped[datetime | None]
    # A worker holds the refund until then while its gateway call is in flight.
    in_flight_until: Mapped[datetime | None]
    # When the retry job last took this refund on; it waits a full interval before the next.
    last_retry_at: Mapped[datetime | None]
    # A person resolved its manual review (refunded another way, confirmed at the gateway):
    # when and how. The retry job and the escalation never take a resolved refund again.
    resolved_at: Mapped[datetime | None]
    resolution: Mapped[str | None] = mapped_column(Text)
    # When a person last acted on it (sent it again, resolved it): the escalation's day counts
    # from then, not from `created_at`, or a refund sent again would be escalated straight back.
    reviewed_at: Mapped[datetime | None]


NOTIFICATION_STATUSES = ("PENDING", "SENT", "DEAD")


class Notification(Base):
    __tablename__ = "notifications"
    __table_args__ = (
        CheckConstraint(_statuses(*NOTIFICATION_STATUSES), name="status"),
        CheckConstraint("channel IN ('email', 'sms', 'push')", name="channel"),
        # The outbox sweep reads only PENDING notifications that are due.
        Index(
            "ix_notifications_pending_next_attempt_at",
            "next_attempt_at",
            postgresql_where=text("status = 'PENDING'"),
            sqlite_where=text("status = 'PENDING'"),
        ),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    channel: Mapped[str] = mapped_column(String(8))
    recipient: Mapped[str] = mapped_column(String(256))
    template: Mapped[str] = mapped_column(String(128))
    data: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'"))
    dedupe_key: Mapped[str | None] = mapped_column(String(256), unique=True)
    status: Mapped[str] = mapped_column(String(16), server_default="PENDING")
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)
    updated_at: Mapped[datetime] = mapped_column(server_default=NOW)
    sent_at: Mapped[datetime | None]
    # When the next delivery attempt is due: at once for a new row, later after a failure.
    next_attempt_at: Mapped[datetime] = mapped_column(server_default=NOW)
    # When a delivery message was last sent for it; the outbox sweep re-sends after a while.
    enqueued_at: Mapped[datetime | None]
    # A worker holds the notification until then while it is being delivered.
    in_flight_until: Mapped[datetime | None]


class NotificationAttempt(Base):
    """One delivery attempt of a notification: its number, outcome and error."""

    __tablename__ = "notification_attempts"
    __table_args__ = (
        CheckConstraint("outcome IN ('SENT', 'TRANSIENT', 'PERMANENT')", name="outcome"),
        Index("ix_notification_attempts_notification_id", "notification_id", "attempt"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    notification_id: Mapped[int] = mapped_column(ForeignKey("notifications.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    # What the provider called the message (SMTP Message-ID, the provider's id).
    provider_ref: Mapped[str | None] = mapped_column(String(256))
    at: Mapped[datetime] = mapped_column(server_default=NOW)


class PushToken(Base):
    """A device's push token. Other services register tokens; a token the provider says is
    unregistered gets `invalidated_at` and is never sent to again."""

    __tablename__ = "push_tokens"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    token: Mapped[str] = mapped_column(String(256), unique=True)
    user_id: Mapped[str | None] = mapped_column(String(128), index=True)
    invalidated_at: Mapped[datetime | None]
    invalid_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)
    updated_at: Mapped[datetime] = mapped_column(server_default=NOW)


DEAD_LETTER_STATUSES = ("NEW", "RETRYING", "REPLAYED", "MANUAL_REVIEW", "DISCARDED")
CLASSIFICATIONS = ("TRANSIENT", "PERMANENT", "UNKNOWN")


class DeadLetter(Timestamps, Base):
    __tablename__ = "dead_letters"
    __table_args__ = (
        CheckConstraint(_statuses(*DEAD_LETTER_STATUSES), name="status"),
        CheckConstraint(
            "classification IN ('TRANSIENT', 'PERMANENT', 'UNKNOWN')", name="classification"
        ),
        Index("ix_dead_letters_status_created_at", "status", "created_at"),
        Index("ix_dead_letters_task_name", "task_name"),
        Index("ix_dead_letters_created_at", "created_at"),
        # The lists' counts by task and error (and health's open count), from the index alone.
        Index(
            "ix_dead_letters_groups",
            "status",
            "task_name",
            "error_type",
            "classification",
            "created_at",
        ),
        Index(
            "ix_dead_letters_new",
            "id",
            postgresql_where=text("status = 'NEW'"),
            sqlite_where=text("status = 'NEW'"),
        ),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    task_name: Mapped[str] = mapped_column(String(128))
    task_id: Mapped[str | None] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'"))
    error_type: Mapped[str] = mapped_column(String(128))
    error_message: Mapped[str] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, server_default="1")
    classification: Mapped[str] = mapped_column(String(16), server_default="UNKNOWN")
    status: Mapped[str] = mapped_column(String(16), server_default="NEW")
    replays: Mapped[int] = mapped_column(Integer, server_default="0")  # replays sent so far
    rule: Mapped[str | None] = mapped_column(String(64))  # the triage rule that decided last
    resolution: Mapped[str | None] = mapped_column(Text)  # why it was closed
    last_replayed_at: Mapped[datetime | None]


class DeadLetterEvent(Base):
    """What happened to a dead letter: triaged, replayed, edited, discarded; who, why, when."""

    __tablename__ = "dead_letter_events"
    __table_args__ = (Index("ix_dead_letter_events_dead_letter_id", "dead_letter_id", "id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    dead_letter_id: Mapped[int] = mapped_column(ForeignKey("dead_letters.id", ondelete="CASCADE"))
    action: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'"))
    at: Mapped[datetime] = mapped_column(server_default=NOW)


class WebhookEvent(Base):
    __tablename__ = "webhook_events"
    __table_args__ = (UniqueConstraint("provider", "event_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    provider: Mapped[str] = mapped_column(String(16))
    event_id: Mapped[str] = mapped_column(String(128))
    event_type: Mapped[str | None] = mapped_column(String(128))
    received_at: Mapped[datetime] = mapped_column(server_default=NOW)
    processed_at: Mapped[datetime | None]
    # The gateway payment or refund the event is about, and what applying it did.
    entity_id: Mapped[str | None] = mapped_column(String(64))
    outcome: Mapped[str | None] = mapped_column(String(32))


class JobRun(Base):
    """One run of a scheduled job, or for a job that runs every few seconds, one heartbeat row
    per job and hour whose counters add up the runs in it."""

    __tablename__ = "job_runs"
    __table_args__ = (
        CheckConstraint(
            "outcome IS NULL OR outcome IN ('OK', 'FAILED', 'SKIPPED')", name="outcome"
        ),
        Index("ix_job_runs_job_name_started_at", "job_name", "started_at"),
        # At most one heartbeat row per job and bucket.
        Index(
            "uq_job_runs_heartbeat",
            "job_name",
            "bucket",
            unique=True,
            postgresql_where=text("bucket IS NOT NULL"),
            sqlite_where=text("bucket IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    job_name: Mapped[str] = mapped_column(String(128))
    bucket: Mapped[datetime | None]
    started_at: Mapped[datetime] = mapped_column(server_default=NOW)
    finished_at: Mapped[datetime | None]
    outcome: Mapped[str | None] = mapped_column(String(16))
    runs: Mapped[int] = mapped_column(Integer, server_default="1")
    counts: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'"))
    error: Mapped[str | None] = mapped_column(Text)
    task_id: Mapped[str | None] = mapped_column(String(64))
    # Who asked for this run, when a person did (`backstop jobs run`, the console's run now).
    requested_by: Mapped[str | None] = mapped_column(String(128))


class ScheduledJob(Base):
    """A job of the beat schedule and when backstop first saw it there: a job that has never
    run is expected to from then on, so a new deployment, or a job a release adds, waits out
    its first window before it counts as missed."""

    __tablename__ = "scheduled_jobs"

    job_name: Mapped[str] = mapped_column(String(128), primary_key=True)
    first_seen_at: Mapped[datetime] = mapped_column(server_default=NOW)


RUN_STATUSES = ("PENDING", "RUNNING", "COMPLETED", "FAILED")
OPEN_RUN = "status IN ('PENDING', 'RUNNING', 'FAILED')"


class ReconciliationRun(Base):
    """One reconciliation of one gateway over one window. At most one run per gateway and
    window is open (not COMPLETED); whoever holds its lease does the work, and its progress
    says where that work resumes."""

    __tablename__ = "reconciliation_runs"
    __table_args__ = (
        CheckConstraint(_statuses(*RUN_STATUSES), name="status"),
        Index(
            "uq_reconciliation_runs_open",
            "gateway",
            "window_start",
            "window_end",
            unique=True,
            postgresql_where=text(OPEN_RUN),
            sqlite_where=text(OPEN_RUN),
        ),
        Index("ix_reconciliation_runs_gateway_window", "gateway", "window_start", "window_end"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    gateway: Mapped[str] = mapped_column(String(16))
    window_start: Mapped[datetime]
    window_end: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(16), server_default="PENDING")
    started_at: Mapped[datetime] = mapped_column(server_default=NOW)
    finished_at: Mapped[datetime | None]
    counts: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'"))
    updated_at: Mapped[datetime] = mapped_column(server_default=NOW)
    actor: Mapped[str | None] = mapped_column(String(128))  # who asked for it
    # Whoever works on the run holds it until `lease_until`, renewed with every commit.
    owner: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    progress: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'"))
    error: Mapped[str | None] = mapped_column(Text)


class ReconciliationSeen(Base):
    """The payments a run has compared, one row per committed batch of pages, their ids as
    packed 64-bit integers: how a run resumed after a crash still knows which of the window's
    payments its gateway listed. Deleted when the run completes."""

    __tablename__ = "reconciliation_seen"

    run_id: Mapped[int] = mapped_column(
        ForeignKey("reconciliation_runs.id", ondelete="CASCADE"), primary_key=True
    )
    batch: Mapped[int] = mapped_column(Integer, primary_key=True)
    payment_ids: Mapped[bytes] = mapped_column(LargeBinary)


DISCREPANCY_TYPES = ("MISSING_IN_DB", "STATUS_MISMATCH", "AMOUNT_MISMATCH", "MISSING_AT_GATEWAY")
# A finding's review by a person: OPEN until someone acknowledges (is on it) or resolves it.
DISCREPANCY_STATUSES = ("OPEN", "ACKNOWLEDGED", "RESOLVED")


class ReconciliationDiscrepancy(Base):
    __tablename__ = "reconciliation_discrepancies"
    __table_args__ = (
        CheckConstraint(
            "type IN ('MISSING_IN_DB', 'STATUS_MISMATCH', 'AMOUNT_MISMATCH', 'MISSING_AT_GATEWAY')",
            name="type",
        ),
        # A payment listed twice (offset paging shifts) is one finding per run.
        UniqueConstraint("run_id", "type", "gateway_payment_id"),
        CheckConstraint(_statuses(*DISCREPANCY_STATUSES), name="status"),
        Index("ix_reconciliation_discrepancies_run_id_status", "run_id", "status"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("reconciliation_runs.id"), index=True)
    type: Mapped[str] = mapped_column(String(32))
    payment_id: Mapped[int | None] = mapped_column(ForeignKey("payments.id"))
    gateway_payment_id: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'"))
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)
    # True when the run corrected the database (a safe, forward status change); False when
    # the finding waits for a person.
    fixed: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # The person's review, moved by the audited transition helper (`state_transitions`).
    status: Mapped[str] = mapped_column(String(16), server_default="OPEN")
    updated_at: Mapped[datetime] = mapped_column(server_default=NOW)


class StateTransition(Base):
    """The audit trail of every status change, written by `workers.db.transition`."""

    __tablename__ = "state_transitions"
    __table_args__ = (
        Index("ix_state_transitions_entity", "entity", "entity_id"),
        # The console's charts: an entity's changes over the last hours or days, read from
        # the index alone.
        Index("ix_state_transitions_entity_at", "entity", "at", postgresql_include=["to_status"]),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    entity: Mapped[str] = mapped_column(String(32))
    entity_id: Mapped[int] = mapped_column(BigInteger)
    from_status: Mapped[str] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(server_default=NOW)
