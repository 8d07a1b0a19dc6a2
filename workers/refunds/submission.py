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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from workers.db import Steps, transition
from workers.errors import (
    Defer,
    NotFound,
    PermanentError,
    TransientError,
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
from workers.models import Payment, Refund
from workers.observability.alerts import raise_alert

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


def call_gateway(claim: Claim, now: datetime) -> GatewayRefund:
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


# What `last_error` says of a refund whose earlier attempt the gateway made after a newer one
# started: a person must look at the gateway before any new key is issued.
SUPERSEDED = "an earlier attempt's refund exists at the gateway"


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
            .values(
                requires_manual_review=True,
                updated_at=now,
                last_error=f"{SUPERSEDED}: gateway refund {result.id} ({result.raw_status}) "
                f"was made for key {key}",
            )
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
    steps: Steps,
    refund_id: int,
    clock: Callable[[], datetime],
    gateway_for: GatewayFor,
    *,
    lease: timedelta,
    actor: str = "refunds.submit",
) -> str:
    """Send one PENDING refund to its gateway, at most once at the gateway, in three steps:
    claim (committed before anything is sent), the call (no transaction open), the outcome.
    Returns the outcome (the new status, or why nothing was sent). Transient failures are
    re-raised after they are recorded, for the caller to retry."""
    with steps.step("claim") as session:
        claim = claim_attempt(session, refund_id, clock(), lease, gateway_for)
    if claim.request is None:
        return claim.outcome
    try:
        result = call_gateway(claim, clock())
    except CircuitOpen as error:  # the breaker opened since the claim looked: nothing was sent
        with steps.step("error") as session:
            record_error(session, refund_id, error, clock(), actor)
        raise Defer(open_seconds(claim.gateway), str(error)) from error
    except (GatewayTransient, OutcomeUnknown, GatewayPermanent) as error:
        with steps.step("error") as session:
            record_error(session, refund_id, error, clock(), actor)
        if isinstance(error, GatewayPermanent):
            log.warning("refund.failed", extra={"refund_id": refund_id, "error": one_line(error)})
            return "FAILED"
        raise
    except Exception as unexpected:  # the request may have left: never a failure
        error = OutcomeUnknown(
            f"refunds {refund_id}: unexpected {type(unexpected).__name__} while sending: "
            f"{one_line(unexpected)}"
        )
        with steps.step("error") as session:
            record_error(session, refund_id, error, clock(), actor)
        raise error from unexpected
    with steps.step("outcome") as session:
        status = record_outcome(
            session, refund_id, claim.request.idempotency_key, result, clock(), actor
        )
    log.info(
        "refund.sent",
        extra={"refund_id": refund_id, "status": status, "gateway_refund_id": result.id},
    )
    return status
