"""The hourly refund job (`refunds.retry_failed`): refunds whose submission never finished are
submitted again, FAILED ones get a new attempt with a new key until REFUND_MAX_ATTEMPTS,
PROCESSING ones are re-checked at their gateway, and what stays unresolved past
REFUND_ESCALATE_AFTER_SECONDS goes to manual review with an alert."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from workers.db import Steps, claim, transition_rows
from workers.messaging.enqueue import enqueue_after_commit
from workers.models import Refund
from workers.observability.alerts import raise_alert
from workers.refunds.submission import new_key

log = logging.getLogger("backstop.refunds")


# Two runs of the retry job within this gap never take the same refund on twice.
RETRY_CLAIM_GAP = timedelta(minutes=10)


@dataclass(frozen=True)
class RetryPolicy:
    stuck_after: timedelta  # PROCESSING longer than this: re-check at the gateway
    pending_after: timedelta  # PENDING longer than this: its submission never finished
    escalate_after: timedelta  # unresolved longer than this: manual review and an alert
    max_attempts: int  # attempts (keys) before a FAILED refund goes to manual review
    batch_size: int = 1000
    check_chunk: int = 200  # PROCESSING refunds re-checked by one `refunds.check_many` task


@dataclass
class RetryCounts:
    checked: int = 0  # PROCESSING refunds sent to be re-checked at the gateway
    resubmitted: int = 0  # PENDING refunds sent again with their key
    reattempted: int = 0  # FAILED refunds given a new attempt with a new key
    escalated: int = 0  # moved to manual review, with an alert

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def retry_stuck_refunds(
    steps: Steps,
    clock: Callable[[], datetime],
    policy: RetryPolicy,
    actor: str = "refunds.retry_stuck",
) -> RetryCounts:
    """One run of the retry job: escalate what waited too long, then take every due refund on
    in batches claimed with SKIP LOCKED, and fan the gateway work out across the workers (sent
    after each batch commits): re-checks as `refunds.check_many` tasks of `check_chunk`
    refunds, submissions as one `refunds.submit` per refund. Two runs at once split the
    refunds between them."""
    counts = RetryCounts()
    with steps.step("escalate") as session:  # the flags and their one alert, together
        escalated = escalate_unresolved(session, clock(), policy)
        alert_escalated(session, escalated, clock())
    counts.escalated = len(escalated)
    while True:
        with steps.step("take") as session:
            taken = take_due(session, clock(), policy, actor)
        for status, ids in taken.items():
            if status == "PROCESSING":
                counts.checked += len(ids)
            elif status == "PENDING":
                counts.resubmitted += len(ids)
            else:
                counts.reattempted += len(ids)
        if sum(map(len, taken.values())) < policy.batch_size:
            return counts


@dataclass(frozen=True, order=True)
class Escalated:
    id: int
    status: str
    created_at: datetime
    last_error: str | None


def escalate_unresolved(session: Session, now: datetime, policy: RetryPolicy) -> list[Escalated]:
    """Flag every refund unresolved past `escalate_after`, or FAILED with no attempts left, for
    manual review, in one statement: none is retried automatically again. A second run at the
    same moment waits on the rows and then finds them flagged, so each is escalated once."""
    open_refund = (Refund.status != "COMPLETED") & Refund.requires_manual_review.is_(False)
    since = func.coalesce(Refund.reviewed_at, Refund.created_at)
    overdue = (since <= now - policy.escalate_after) | (
        (Refund.status == "FAILED") & (Refund.attempts >= policy.max_attempts)
    )
    rows = session.execute(
        update(Refund)
        .where(open_refund, overdue)
        .values(requires_manual_review=True, updated_at=now)
        .returning(Refund.id, Refund.status, Refund.created_at, Refund.last_error)
        .execution_options(synchronize_session=False)
    ).all()
    return sorted(Escalated(row.id, row.status, row.created_at, row.last_error) for row in rows)


SHOWN_IDS = 20  # refund ids named in the alert's message; all of them are in its fields


def alert_escalated(session: Session, escalated: list[Escalated], now: datetime) -> None:
    """One alert for everything one run escalated: how many, which, the oldest and the
    statuses. After a day-long gateway outage, a thousand refunds page once, not a thousand
    times."""
    if not escalated:
        return
    ids = [refund.id for refund in escalated]
    oldest = min(escalated, key=lambda refund: refund.created_at)
    statuses = Counter(refund.status for refund in escalated)
    named = ", ".join(map(str, ids[:SHOWN_IDS])) + (" ..." if len(ids) > SHOWN_IDS else "")
    single = len(ids) == 1
    kinds = ", ".join(f"{count} {status}" for status, count in sorted(statuses.items()))
    raise_alert(
        session,
        "refund_manual_review",
        f"{len(ids)} refund{'' if single else 's'} need{'s' if single else ''} manual review "
        f"and will not be retried automatically ({kinds}; oldest: refund {oldest.id}, since "
        f"{oldest.created_at.isoformat()}): {named}",
        # One page per run: its time and the very set of refunds it escalated.
        dedupe="refund-manual-review:"
        + hashlib.sha256(f"{now.isoformat()}:{ids}".encode()).hexdigest()[:24],
        now=now,
        count=len(ids),
        refund_ids=",".join(map(str, ids)),
        oldest_refund_id=oldest.id,
        oldest_since=oldest.created_at.isoformat(),
        last_error=oldest.last_error or "",
    )


def start_attempts(
    session: Session,
    failed: Sequence[tuple[int, str | None]],
    *,
    actor: str,
    now: datetime,
    reason: str | None = None,
    values: dict[str, Any] | None = None,
) -> list[int]:
    """FAILED refunds' next attempts, given as (refund id, the gateway refund that failed):
    PENDING again, each with a new key (never one the gateway has seen), in one audited batch
    transition. The caller has them locked, and sends `refunds.submit` once it commits."""
    return transition_rows(
        session,
        "refunds",
        {refund_id: {"idempotency_key": new_key(refund_id)} for refund_id, _ in failed},
        "FAILED",
        "PENDING",
        actor=actor,
        reasons={
            refund_id: reason or f"new attempt after gateway refund {gateway_id or '-'} failed"
            for refund_id, gateway_id in failed
        },
        now=now,
        values={"key_sent_at": None, "gateway_refund_id": None, **(values or {})},
    )


def take_due(
    session: Session, now: datetime, policy: RetryPolicy, actor: str
) -> dict[str, list[int]]:
    """Claim one batch of due refunds, mark them taken, start new attempts for FAILED ones,
    and send their tasks after commit. Returns the ids taken, by their status when taken."""
    lease_over = Refund.in_flight_until.is_(None) | (Refund.in_flight_until <= now)
    due = (
        ((Refund.status == "PROCESSING") & (Refund.updated_at <= now - policy.stuck_after))
        | (
            (Refund.status == "PENDING")
            & (Refund.updated_at <= now - policy.pending_after)
            & lease_over
        )
        | ((Refund.status == "FAILED") & (Refund.attempts < policy.max_attempts))
    )
    not_recently = Refund.last_retry_at.is_(None) | (Refund.last_retry_at <= now - RETRY_CLAIM_GAP)
    rows = session.execute(
        claim(
            select(Refund.id, Refund.status, Refund.gateway_refund_id)
            .where(Refund.requires_manual_review.is_(False), due, not_recently)
            .order_by(Refund.id),
            policy.batch_size,
        )
    ).all()
    taken: dict[str, list[int]] = {"PROCESSING": [], "PENDING": [], "FAILED": []}
    if not rows:
        return taken
    session.execute(
        update(Refund).where(Refund.id.in_([row.id for row in rows])).values(last_retry_at=now)
    )
    for row in rows:
        taken[row.status].append(row.id)
    start_attempts(
        session,
        [(row.id, row.gateway_refund_id) for row in rows if row.status == "FAILED"],
        actor=actor,
        now=now,
    )
    stuck = taken["PROCESSING"]
    for start in range(0, len(stuck), policy.check_chunk):
        chunk = stuck[start : start + policy.check_chunk]
        enqueue_after_commit(session, "refunds.check_many", {"refund_ids": chunk})
    for refund_id in taken["PENDING"] + taken["FAILED"]:
        enqueue_after_commit(session, "refunds.submit", {"refund_id": refund_id})
    return taken
