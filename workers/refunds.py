"""Refund submission: each refund reaches its gateway at most once, whatever fails.

An attempt runs in three steps. (1) In one transaction the refund row is locked, its attempt's
idempotency key is created if it has none, and a short in-flight lease is taken; that commits
before anything is sent. (2) The gateway is called outside any transaction, always with the
attempt's key and an identical body, so a repeat is answered with the refund already made.
(3) The outcome moves the row through the audited transition helper. A crash anywhere leaves
a PENDING row with its key: the next attempt sends the same key again, or, once the gateway may
have forgotten the key, first looks the refund up by the reference we wrote on it.
"""

from __future__ import annotations

import logging
import secrets
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from workers.alerts import raise_alert
from workers.db import claim, transition, transition_batch
from workers.dead_letters import record_dead_letter
from workers.enqueue import enqueue_after_commit
from workers.errors import (
    Defer,
    NotFound,
    PermanentError,
    TransientError,
    classify,
    one_line,
)
from workers.gateways.base import (
    CircuitOpen,
    Gateway,
    GatewayPermanent,
    GatewayRefund,
    GatewayTransient,
    OutcomeUnknown,
    RefundRequest,
)
from workers.gateways.breaker import defer_while_open, open_seconds
from workers.gateways.fanout import thread_pool
from workers.models import Payment, Refund

log = logging.getLogger("backstop.refunds")


GatewayFor = Callable[[str], Gateway]


class RefundInFlight(TransientError):
    """Another worker has this refund's gateway call in flight; try again after its lease."""


@dataclass(frozen=True)
class Claim:
    """What step 1 decided: `request` is set when the refund is to be sent."""

    outcome: str  # "send", or why not: already_completed, processing, failed, manual_review
    gateway: Gateway | None = None
    request: RefundRequest | None = None
    key_sent_at: datetime | None = None  # when this key was first sent, before this attempt


def new_key(refund_id: int) -> str:
    """A fresh idempotency key: Razorpay wants 10+ characters of [A-Za-z0-9_-]."""
    return f"bkr-{refund_id}-{secrets.token_hex(8)}"


def claim_attempt(
    session: Session, refund_id: int, now: datetime, lease: timedelta, gateway_for: GatewayFor
) -> Claim:
    """Step 1: lock the refund, decide whether to send it, and if so persist the key and take
    the lease. The caller commits before any gateway call. The adapter is resolved before
    anything is written, so a gateway without credentials changes nothing."""
    row = session.execute(
        select(Refund, Payment.gateway, Payment.gateway_payment_id)
        .join(Payment, Payment.id == Refund.payment_id)
        .where(Refund.id == refund_id)
        .with_for_update(of=Refund)
    ).one_or_none()
    if row is None:
        raise NotFound(f"refunds {refund_id} does not exist")
    refund, gateway_name, gateway_payment_id = row
    if refund.requires_manual_review:
        return Claim("manual_review")
    if refund.status != "PENDING":
        outcome = {
            "COMPLETED": "already_completed",
            "PROCESSING": "processing",
            "FAILED": "failed",
        }[refund.status]
        return Claim(outcome)
    if refund.in_flight_until is not None and refund.in_flight_until > now:
        raise RefundInFlight(
            f"refunds {refund_id} is in flight until {refund.in_flight_until.isoformat()}"
        )
    if not gateway_payment_id:
        raise PermanentError(
            f"refunds {refund_id}: payment {refund.payment_id} has no gateway_payment_id to refund"
        )
    gateway = gateway_for(gateway_name)
    defer_while_open(gateway)
    sent_before = refund.key_sent_at
    key = refund.idempotency_key or new_key(refund_id)
    session.execute(
        update(Refund)
        .where(Refund.id == refund_id)
        .values(
            idempotency_key=key,
            key_sent_at=sent_before or now,
            in_flight_until=now + lease,
            # `attempts` counts attempts, that is keys: sending the same key again is not one.
            attempts=Refund.attempts + (0 if refund.idempotency_key else 1),
            updated_at=now,
        )
    )
    request = RefundRequest(
        refund_id=refund_id,
        idempotency_key=key,
        gateway_payment_id=gateway_payment_id,
        amount=refund.amount,
        currency=refund.currency,
        reason=refund.reason,
    )
    return Claim("send", gateway, request, sent_before)


def send(claim: Claim, now: datetime) -> GatewayRefund:
    """Step 2: the gateway call. A key sent before is not sent again before the gateway is
    asked for the refund it may have made: that earlier request's outcome was unknown (a
    timeout, a lost answer, a crash), and the gateway may have forgotten the key since."""
    gateway = claim.gateway
    assert claim.request is not None and gateway is not None
    if claim.key_sent_at is not None:
        try:
            found = gateway.find_refund(claim.request)
        except GatewayPermanent as refused:  # cannot ask (auth, a 4xx): still unknown, not FAILED
            raise OutcomeUnknown(
                f"the refund an earlier attempt may have made cannot be looked up: {refused}"
            ) from refused
        if found is not None:
            return found
    return gateway.submit_refund(claim.request)


def record_outcome(
    session: Session,
    refund_id: int,
    key: str | None,
    result: GatewayRefund,
    now: datetime,
    actor: str,
) -> str:
    """Step 3, success: attach the gateway's refund and move the row to the status it maps to,
    both only while `key` is still the refund's current attempt (an answer about an attempt
    a newer one replaced must not move the refund: see `superseded_outcome`)."""
    current = Refund.idempotency_key.is_(None) if key is None else Refund.idempotency_key == key
    attached = session.execute(
        update(Refund)
        .where(Refund.id == refund_id, current)
        .values(
            gateway_refund_id=result.id,
            in_flight_until=None,
            last_error=None if result.status != "FAILED" else f"gateway says {result.raw_status}",
        )
    ).rowcount
    if not attached:
        return superseded_outcome(session, refund_id, key, result, now)
    transition(
        session,
        "refunds",
        refund_id,
        result.status,
        actor=actor,
        reason=f"gateway refund {result.id} is {result.raw_status}",
        now=now,
        guard=current,
    )
    return result.status


def superseded_outcome(
    session: Session, refund_id: int, key: str | None, result: GatewayRefund, now: datetime
) -> str:
    """A gateway answer for an attempt whose key a newer attempt replaced. It changes nothing
    by itself; but if it says that refund exists, the newer attempt may refund the customer a
    second time: the refund goes to manual review, with an alert. Returns the current status."""
    status = session.execute(select(Refund.status).where(Refund.id == refund_id)).scalar_one()
    log.warning(
        "refund.superseded_outcome",
        extra={"refund_id": refund_id, "gateway_refund_id": result.id, "status": result.status},
    )
    if result.status in ("PROCESSING", "COMPLETED"):
        session.execute(
            update(Refund)
            .where(Refund.id == refund_id)
            .values(requires_manual_review=True, updated_at=now)
        )
        raise_alert(
            session,
            "refund_manual_review",
            f"refund {refund_id}: the gateway made refund {result.id} ({result.raw_status}) "
            f"for an earlier attempt (key {key}) after a newer attempt had started: it may be "
            "refunded twice; check the payment's refunds at the gateway",
            dedupe=f"refund-superseded:{refund_id}:{result.id}",
            now=now,
            refund_id=refund_id,
            gateway_refund_id=result.id,
        )
    return str(status)


def record_error(
    session: Session, refund_id: int, error: Exception, now: datetime, actor: str
) -> None:
    """Step 3, failure: release the lease and keep the error. A permanent refusal fails the
    attempt (the retry job may start a new one, with a new key); anything else keeps the row
    PENDING with its key, to be sent again."""
    session.execute(
        update(Refund)
        .where(Refund.id == refund_id)
        .values(in_flight_until=None, last_error=one_line(error)[:2000], updated_at=now)
    )
    if isinstance(error, GatewayPermanent):
        transition(
            session,
            "refunds",
            refund_id,
            "FAILED",
            actor=actor,
            reason=one_line(error)[:500],
            now=now,
        )


def submit_refund(
    session: Session,
    refund_id: int,
    clock: Callable[[], datetime],
    gateway_for: GatewayFor,
    *,
    lease: timedelta,
    actor: str = "refunds.submit",
) -> str:
    """Send one PENDING refund to its gateway, at most once at the gateway. Commits between
    the steps; returns the outcome (the new status, or why nothing was sent). Transient
    failures are re-raised after they are recorded, for the caller to retry."""
    claim = claim_attempt(session, refund_id, clock(), lease, gateway_for)
    session.commit()
    if claim.request is None:
        return claim.outcome
    try:
        result = send(claim, clock())
    except CircuitOpen as error:  # the breaker opened since the claim looked: nothing was sent
        record_error(session, refund_id, error, clock(), actor)
        session.commit()
        raise Defer(open_seconds(claim.gateway), str(error)) from error
    except (GatewayTransient, OutcomeUnknown, GatewayPermanent) as error:
        record_error(session, refund_id, error, clock(), actor)
        session.commit()
        if isinstance(error, GatewayPermanent):
            log.warning("refund.failed", extra={"refund_id": refund_id, "error": one_line(error)})
            return "FAILED"
        raise
    except Exception as unexpected:  # the request may have left: never a failure
        error = OutcomeUnknown(
            f"refunds {refund_id}: unexpected {type(unexpected).__name__} while sending: "
            f"{one_line(unexpected)}"
        )
        record_error(session, refund_id, error, clock(), actor)
        session.commit()
        raise error from unexpected
    status = record_outcome(
        session, refund_id, claim.request.idempotency_key, result, clock(), actor
    )
    log.info(
        "refund.sent",
        extra={"refund_id": refund_id, "status": status, "gateway_refund_id": result.id},
    )
    return status


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
    session: Session,
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
    while True:
        escalated = escalate_unresolved(session, clock(), policy)
        session.commit()
        counts.escalated += len(escalated)
        if len(escalated) < policy.batch_size:
            break
    while True:
        taken = take_due(session, clock(), policy, actor)
        session.commit()
        for status, ids in taken.items():
            if status == "PROCESSING":
                counts.checked += len(ids)
            elif status == "PENDING":
                counts.resubmitted += len(ids)
            else:
                counts.reattempted += len(ids)
        if sum(map(len, taken.values())) < policy.batch_size:
            return counts


def escalate_unresolved(session: Session, now: datetime, policy: RetryPolicy) -> list[int]:
    """Flag one batch of refunds for manual review: unresolved past `escalate_after`, or
    FAILED with no attempts left. Each gets one alert; none is retried automatically again."""
    open_refund = (Refund.status != "COMPLETED") & Refund.requires_manual_review.is_(False)
    overdue = (Refund.created_at <= now - policy.escalate_after) | (
        (Refund.status == "FAILED") & (Refund.attempts >= policy.max_attempts)
    )
    rows = session.execute(
        claim(
            select(Refund.id, Refund.status, Refund.created_at, Refund.last_error)
            .where(open_refund, overdue)
            .order_by(Refund.id),
            policy.batch_size,
        )
    ).all()
    if not rows:
        return []
    session.execute(
        update(Refund)
        .where(Refund.id.in_([row.id for row in rows]))
        .values(requires_manual_review=True, updated_at=now)
    )
    for row in rows:
        raise_alert(
            session,
            "refund_manual_review",
            f"refund {row.id} is {row.status} since {row.created_at.isoformat()}: "
            "it needs manual review and will not be retried automatically",
            dedupe=f"refund-manual-review:{row.id}",
            now=now,
            refund_id=row.id,
            status=row.status,
            last_error=row.last_error or "",
        )
    return [row.id for row in rows]


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
        if row.status == "FAILED":
            transition(
                session,
                "refunds",
                row.id,
                "PENDING",
                actor=actor,
                now=now,
                reason=f"new attempt after gateway refund {row.gateway_refund_id or '-'} failed",
                values={
                    "idempotency_key": new_key(row.id),
                    "key_sent_at": None,
                    "gateway_refund_id": None,
                },
            )
    stuck = taken["PROCESSING"]
    for start in range(0, len(stuck), policy.check_chunk):
        chunk = stuck[start : start + policy.check_chunk]
        enqueue_after_commit(session, "refunds.check_many", {"refund_ids": chunk})
    for refund_id in taken["PENDING"] + taken["FAILED"]:
        enqueue_after_commit(session, "refunds.submit", {"refund_id": refund_id})
    return taken


@dataclass
class Checked:
    """What one round of gateway re-checks found, refund by refund."""

    statuses: dict[int, str] = field(default_factory=dict)  # status afterwards, moved or not
    retry: dict[int, Exception] = field(default_factory=dict)  # no answer yet: ask again later
    failed: dict[int, Exception] = field(default_factory=dict)  # cannot be asked: dead letter
    deferred: dict[int, float] = field(default_factory=dict)  # breaker open: seconds to wait

    def outcome(self, refund_id: int) -> str:
        """One refund's status afterwards, or its failure raised as the task's own."""
        if refund_id in self.deferred:
            raise Defer(self.deferred[refund_id], f"refunds {refund_id}: circuit breaker is open")
        error = self.retry.get(refund_id) or self.failed.get(refund_id)
        if error is not None:
            raise error
        return self.statuses[refund_id]

    def counts(self) -> dict[str, int]:
        counts = {"completed": 0, "failed": 0, "processing": 0}
        for status in self.statuses.values():
            key = status.lower()
            counts[key if key in counts else "processing"] += 1
        counts.update(retry=len(self.retry), errors=len(self.failed), deferred=len(self.deferred))
        return counts


def check_refunds(
    session: Session,
    refund_ids: Sequence[int],
    clock: Callable[[], datetime],
    gateway_for: GatewayFor,
    *,
    concurrency: int = 1,
    actor: str = "refunds.check",
) -> Checked:
    """Ask the gateways about PROCESSING refunds and move on each one they have a final answer
    for. The rows are read in one select and that transaction ends before any call; the calls
    run `concurrency` at a time; the answers are written with one audited batch transition per
    outcome, in the session's transaction, for the caller to commit. Refunds that are no longer
    PROCESSING, or are in manual review, are reported as they are and not asked about."""
    rows = session.execute(
        select(
            Refund.id,
            Refund.status,
            Refund.requires_manual_review,
            Refund.gateway_refund_id,
            Refund.idempotency_key,
            Refund.amount,
            Refund.currency,
            Refund.reason,
            Payment.gateway,
            Payment.gateway_payment_id,
        )
        .join(Payment, Payment.id == Refund.payment_id)
        .where(Refund.id.in_(list(refund_ids)))
        .order_by(Refund.id)
    ).all()
    session.commit()  # nothing stays open while the gateways answer
    checked = Checked()
    for refund_id in sorted(set(refund_ids) - {row.id for row in rows}):
        checked.failed[refund_id] = NotFound(f"refunds {refund_id} does not exist")
    calls: list[tuple[Any, Gateway]] = []
    gateways: dict[str, Gateway | Exception] = {}
    for row in rows:
        if row.status != "PROCESSING" or row.requires_manual_review:
            checked.statuses[row.id] = row.status
            continue
        if row.gateway not in gateways:
            try:
                gateways[row.gateway] = gateway_for(row.gateway)
            except GatewayPermanent as exc:  # not configured: every refund on it says so
                gateways[row.gateway] = exc
        gateway = gateways[row.gateway]
        if isinstance(gateway, Exception):
            checked.failed[row.id] = gateway
        elif (wait := open_seconds(gateway)) > 0:
            checked.deferred[row.id] = wait
        else:
            calls.append((row, gateway))

    found: dict[tuple[str, str], list[int]] = defaultdict(list)
    for (row, gateway), answer in zip(calls, ask_gateways(calls, concurrency), strict=True):
        if isinstance(answer, CircuitOpen):  # opened while this round was under way
            checked.deferred[row.id] = max(open_seconds(gateway), 1.0)
        elif isinstance(answer, GatewayPermanent):
            checked.failed[row.id] = answer
        elif isinstance(answer, Exception):
            checked.retry[row.id] = answer
        elif answer is None or answer.status == "PROCESSING":
            checked.statuses[row.id] = "PROCESSING"  # left to the next run, then escalation
        elif row.gateway_refund_id:
            found[(answer.status, answer.raw_status)].append(row.id)
        else:  # found by our reference: the row learns its gateway refund id
            now = clock()
            # The refund's reference names the attempt it was made for: an older one than the
            # row's current attempt is a superseded outcome.
            key = answer.idempotency_key or row.idempotency_key
            status = record_outcome(session, row.id, key, answer, now, actor)
            checked.statuses[row.id] = status

    now = clock()
    for (status, raw_status), ids in found.items():
        transition_batch(
            session,
            "refunds",
            select(Refund.id).where(Refund.id.in_(ids)),
            "PROCESSING",
            status,
            actor=actor,
            reason=f"gateway says {raw_status}",
            now=now,
            values={
                "in_flight_until": None,
                "last_error": f"gateway says {raw_status}" if status == "FAILED" else None,
            },
        )
        checked.statuses.update(dict.fromkeys(ids, status))
    errors = {**checked.retry, **checked.failed}
    known = {row.id for row in rows}
    if errors.keys() & known:
        session.execute(
            update(Refund),
            [
                {"id": refund_id, "last_error": one_line(error)[:2000]}
                for refund_id, error in errors.items()
                if refund_id in known
            ],
        )
    return checked


def ask_gateways(
    calls: Sequence[tuple[Any, Gateway]], concurrency: int
) -> list[GatewayRefund | Exception | None]:
    """Each refund's answer from its gateway, in order: the refund, None (the gateway has no
    refund with our reference), or the gateway error. Run on a pool kept per process, so the
    SDKs' HTTP connections (kept per thread by Stripe's) are reused from one round to the next."""

    def ask(call: tuple[Any, Gateway]) -> GatewayRefund | Exception | None:
        row, gateway = call
        try:
            if row.gateway_refund_id:
                return gateway.fetch_refund(row.gateway_payment_id, row.gateway_refund_id)
            return gateway.find_refund(
                RefundRequest(
                    refund_id=row.id,
                    idempotency_key=row.idempotency_key or "",
                    gateway_payment_id=row.gateway_payment_id,
                    amount=row.amount,
                    currency=row.currency,
                    reason=row.reason,
                )
            )
        except (GatewayTransient, GatewayPermanent, OutcomeUnknown) as exc:
            return exc
        except SoftTimeLimitExceeded:
            raise  # the task's own time is up, not this refund's answer
        except Exception as exc:  # one refund's odd answer never costs the others theirs
            return GatewayTransient(f"refunds {row.id}: unexpected {type(exc).__name__}: {exc}")

    if concurrency <= 1 or len(calls) <= 1:
        return [ask(call) for call in calls]
    return list(thread_pool(concurrency).map(ask, calls))


def finish_checks(
    session: Session,
    checked: Checked,
    *,
    task_id: str | None,
    now: datetime,
    max_countdown: float,
) -> None:
    """After a batch of re-checks: refunds whose gateway's breaker is open are sent again as
    one task once it may close; each refund that cannot be asked about at all gets its own dead
    letter as a `refunds.check`, replayable on its own. Both commit with the outcomes."""
    waits: dict[int, list[int]] = defaultdict(list)
    for refund_id, seconds in checked.deferred.items():
        waits[max(1, min(int(seconds + 0.999), int(max_countdown)))].append(refund_id)
    for countdown, ids in waits.items():
        enqueue_after_commit(
            session, "refunds.check_many", {"refund_ids": sorted(ids)}, countdown=countdown
        )
    for refund_id, error in checked.failed.items():
        letter = record_dead_letter(
            session,
            task_name="refunds.check",
            task_id=task_id,
            payload={"refund_id": refund_id},
            error=error,
            attempts=1,
            classification=classify(error),
            now=now,
        )
        log.error(
            "refund.check_failed",
            extra={"refund_id": refund_id, "dead_letter_id": letter, "error": one_line(error)},
        )
