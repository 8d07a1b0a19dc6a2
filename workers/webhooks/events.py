"""Gateway webhook events: verified on the raw body, recorded once, applied forward only.

`webhooks.process {provider, body, signature}` carries the body exactly as the gateway sent it
and the signature header's value. The signature is checked with the SDKs' own verifiers
(constant-time comparisons; Stripe's with its 300 s tolerance) before the body is even parsed.
A bad or stale signature is a permanent failure: a security event in the log, with neither
the secret nor the body, and a dead letter.

The event is recorded in `webhook_events` under `(provider, event_id)` in the same transaction
as its effect, so a second delivery finds it and does nothing, and two deliveries processed at
once wait on the unique index for each other. Stripe events carry their id; Razorpay events do
not (it sends one in a header the task does not receive), so a Razorpay event is identified by
what it says about what: `payment.captured:pay_...`.

Effects go through the audited transition helper and only forward: an event that would move a
payment or refund backwards (a COMPLETED payment the gateway calls failed, a refund we marked
FAILED that the gateway processed) changes nothing and raises an alert.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import razorpay
import razorpay.errors
import stripe
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from workers.db import transition
from workers.db.transitions import MACHINES
from workers.db.upsert import insert_ignore
from workers.errors import PermanentError
from workers.gateways.base import payment_status, refund_status
from workers.models import Payment, Refund, WebhookEvent
from workers.observability.alerts import raise_alert

log = logging.getLogger("backstop.webhooks")
security = logging.getLogger("backstop.security")

STRIPE_TOLERANCE_SECONDS = 300
SECRET_SETTING = {"razorpay": "RAZORPAY_WEBHOOK_SECRET", "stripe": "STRIPE_WEBHOOK_SECRET"}


class WebhookNotConfigured(PermanentError):
    """No webhook secret for the provider: nothing can be verified, so nothing is applied."""


class WebhookSignatureError(PermanentError):
    """The signature does not verify against the body, or it is too old."""


class MalformedWebhook(PermanentError):
    """A correctly signed body that is not an event we can read."""


def verify(provider: str, body: str, signature: str, secret: str) -> None:
    """Raise WebhookSignatureError unless `signature` signs `body` (the raw string as
    received) with `secret`; the security event is logged here."""
    try:
        if not signature.isascii():  # hmac.compare_digest refuses non-ASCII strings
            raise razorpay.errors.SignatureVerificationError("Unable to extract: not ASCII")
        if provider == "razorpay":
            razorpay.Utility().verify_webhook_signature(body, signature, secret)
        else:
            stripe.WebhookSignature.verify_header(
                body, signature, secret, tolerance=STRIPE_TOLERANCE_SECONDS
            )
    except (razorpay.errors.SignatureVerificationError, stripe.SignatureVerificationError) as exc:
        reason = _reason(str(exc))
        security.warning(
            "webhook.signature_rejected",
            extra={
                "provider": provider,
                "reason": reason,
                "body_bytes": len(body.encode()),
                "body_sha256": hashlib.sha256(body.encode()).hexdigest()[:16],
            },
        )
        # Raised afresh: the SDK's exception holds the body and the header.
        raise WebhookSignatureError(f"{provider} webhook rejected: {reason}") from None


def _reason(message: str) -> str:
    if "tolerance" in message:
        return "timestamp outside the 300 s tolerance (stale or replayed)"
    if "Unable to extract" in message or "No signatures found with expected scheme" in message:
        return "malformed signature header"
    return "signature does not match the body"


@dataclass(frozen=True)
class Event:
    provider: str
    event_id: str
    event_type: str
    kind: str | None  # payment, refund, or None for events we do not act on
    entity: dict[str, Any]


def parse(provider: str, body: str) -> Event:
    try:
        data = json.loads(body)
        if provider == "razorpay":
            return _razorpay_event(data)
        return _stripe_event(data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MalformedWebhook(f"{provider} webhook body is not an event: {exc}") from None


def _razorpay_event(data: dict[str, Any]) -> Event:
    event_type = str(data["event"])
    payload = data.get("payload") or {}
    for kind in ("refund", "payment"):
        entity = (payload.get(kind) or {}).get("entity")
        if entity:
            return Event("razorpay", f"{event_type}:{entity['id']}", event_type, kind, entity)
    target = next(iter(payload.values()), {}).get("entity", {}).get("id", "")
    return Event("razorpay", f"{event_type}:{target}", event_type, None, {})


def _stripe_event(data: dict[str, Any]) -> Event:
    event_type = str(data["type"])
    entity = data["data"]["object"]
    kind = {"payment_intent": "payment", "refund": "refund"}.get(entity.get("object"))
    return Event("stripe", str(data["id"]), event_type, kind, entity)


def process_webhook(
    session: Session, provider: str, body: str, signature: str, secret: str | None, now: datetime
) -> str:
    """Verify, record once, apply. Returns the outcome: duplicate, applied, no_change,
    ignored, unknown_payment, unknown_refund, amount_mismatch or backwards."""
    if not secret:
        raise WebhookNotConfigured(
            f"{provider} webhooks are not configured: set {SECRET_SETTING[provider]}"
        )
    verify(provider, body, signature, secret)
    event = parse(provider, body)
    entity_id = str(event.entity.get("id")) if event.entity.get("id") else None
    recorded = insert_ignore(
        session,
        WebhookEvent,
        {
            "provider": provider,
            "event_id": event.event_id[:128],
            "event_type": event.event_type[:128],
            "received_at": now,
            "entity_id": entity_id,
        },
        conflict=["provider", "event_id"],
        returning=WebhookEvent.id,
    )
    if not recorded:
        log.info("webhook.duplicate", extra={"provider": provider, "event_id": event.event_id})
        return "duplicate"
    if event.kind == "payment":
        outcome = apply_payment(session, event, now)
    elif event.kind == "refund":
        outcome = apply_refund(session, event, now)
    else:
        outcome = "ignored"
    session.execute(
        update(WebhookEvent)
        .where(WebhookEvent.id == recorded[0])
        .values(processed_at=now, outcome=outcome)
    )
    log.info(
        "webhook.processed",
        extra={
            "provider": provider,
            "event_id": event.event_id,
            "event_type": event.event_type,
            "outcome": outcome,
        },
    )
    return outcome


def _order_id(event: Event) -> str | None:
    if event.provider == "razorpay":
        return event.entity.get("order_id")
    return (event.entity.get("metadata") or {}).get("order_id")


def apply_payment(session: Session, event: Event, now: datetime) -> str:
    entity, provider = event.entity, event.provider
    gateway_id = str(entity["id"])
    raw = str(entity["status"])
    theirs = payment_status(provider, raw)
    row = session.execute(
        select(Payment)
        .where(Payment.gateway == provider, Payment.gateway_payment_id == gateway_id)
        .with_for_update()
    ).scalar_one_or_none()
    order_id = _order_id(event)
    if row is None and order_id:
        row = session.execute(
            select(Payment)
            .where(
                Payment.gateway == provider,
                Payment.gateway_order_id == order_id,
                Payment.gateway_payment_id.is_(None),
            )
            .with_for_update()
        ).scalar_one_or_none()
        if row is not None and theirs not in ("AUTHORIZED", "COMPLETED"):
            return "no_change"  # an unpaid attempt does not claim the order
    if row is None:
        log.warning(
            "webhook.unknown_payment",
            extra={"provider": provider, "gateway_payment_id": gateway_id, "event": event.event_id},
        )
        return "unknown_payment"
    amount, currency = int(entity["amount"]), str(entity["currency"]).upper()
    if row.amount != amount or row.currency.upper() != currency:
        _alert(
            session,
            now,
            event,
            f"payment {row.id}: the gateway has {amount} {currency}, we have "
            f"{row.amount} {row.currency}; not applied",
        )
        return "amount_mismatch"
    if theirs == row.status:
        return "no_change"
    if row.status not in MACHINES["payments"].get(theirs, frozenset()):
        if theirs == "FAILED" or row.status == "FAILED":
            _alert(
                session,
                now,
                event,
                f"payment {row.id} is {row.status} and the gateway says {raw}; not changed",
            )
        return "backwards"
    transition(
        session,
        "payments",
        row.id,
        theirs,
        actor=f"webhooks.{provider}",
        reason=f"{event.event_type} ({event.event_id})",
        now=now,
        values={"gateway_payment_id": gateway_id} if row.gateway_payment_id is None else None,
    )
    return "applied"


def apply_refund(session: Session, event: Event, now: datetime) -> str:
    entity, provider = event.entity, event.provider
    gateway_id = str(entity["id"])
    raw = str(entity["status"])
    theirs = refund_status(provider, raw)
    row = session.execute(
        select(Refund).where(Refund.gateway_refund_id == gateway_id).with_for_update()
    ).scalar_one_or_none()
    link = False
    if row is None:
        # The webhook can beat our own record of the refund id (the submission's response is
        # still on its way): find the refund by the reference we wrote on it, but only for
        # the attempt it belongs to; an older attempt's news is no news.
        reference = entity.get("notes" if provider == "razorpay" else "metadata") or {}
        ours = reference.get("backstop_refund_id") if isinstance(reference, dict) else None
        key = reference.get("backstop_idempotency_key") if isinstance(reference, dict) else None
        if ours and str(ours).isdigit():
            row = session.execute(
                select(Refund).where(Refund.id == int(ours)).with_for_update()
            ).scalar_one_or_none()
            if row is not None and (row.idempotency_key != key or row.gateway_refund_id):
                return "ignored"
            link = row is not None
    if row is None:
        log.warning(
            "webhook.unknown_refund",
            extra={"provider": provider, "gateway_refund_id": gateway_id, "event": event.event_id},
        )
        return "unknown_refund"
    if theirs == row.status:
        return "no_change"
    if row.status not in MACHINES["refunds"].get(theirs, frozenset()):
        if theirs == "COMPLETED" and row.status == "FAILED":
            # A new attempt would refund twice: stop the retry job from starting one.
            session.execute(
                update(Refund)
                .where(Refund.id == row.id)
                .values(requires_manual_review=True, updated_at=now)
            )
            _alert(
                session,
                now,
                event,
                f"refund {row.id} is FAILED but the gateway processed {gateway_id}; "
                "moved to manual review",
            )
        return "backwards"
    transition(
        session,
        "refunds",
        row.id,
        theirs,
        actor=f"webhooks.{provider}",
        reason=f"{event.event_type} ({event.event_id})",
        now=now,
        values={"gateway_refund_id": gateway_id} if link else None,
    )
    return "applied"


def _alert(session: Session, now: datetime, event: Event, message: str) -> None:
    raise_alert(
        session,
        "webhook_conflict",
        message,
        dedupe=f"webhook:{event.provider}:{event.event_id}",
        now=now,
        provider=event.provider,
        event_id=event.event_id,
    )
