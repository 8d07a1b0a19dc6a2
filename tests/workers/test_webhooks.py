"""Webhook events signed the way each gateway signs them: valid, tampered, stale, replayed,
duplicate, and delivered twice at the same moment. The effect happens exactly once."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import pytest
from sqlalchemy import Engine, func, insert, select

from tasks.webhooks import events_not_recorded
from tests.workers.factories import CAPTURED, CURRENCY
from workers.base import utcnow
from workers.db import new_session, session_scope
from workers.devtools.simulator import sign_razorpay, sign_stripe
from workers.models import Notification, Payment, Refund, StateTransition, WebhookEvent
from workers.webhooks.events import (
    MalformedWebhook,
    WebhookNotConfigured,
    WebhookSignatureError,
    process_webhook,
)

SECRET = {"razorpay": "rzp_whsec_0123456789abcdef", "stripe": "whsec_0123456789abcdef"}
CAPTURE_EVENT = {"razorpay": "payment.captured", "stripe": "payment_intent.succeeded"}
FAIL_EVENT = {"razorpay": "payment.failed", "stripe": "payment_intent.canceled"}
FAILED = {"razorpay": "failed", "stripe": "canceled"}
REFUND_EVENT = {"razorpay": "refund.processed", "stripe": "refund.updated"}
PROCESSED = {"razorpay": "processed", "stripe": "succeeded"}
GATEWAYS = ["razorpay", "stripe"]


def sign(name: str, body: str, at: int | None = None) -> str:
    if name == "razorpay":
        return sign_razorpay(body, SECRET[name])
    return sign_stripe(body, SECRET[name], at)


def deliver(name: str, body: str, signature: str, secret: str | None = "default") -> str:
    session = new_session()
    try:
        outcome = process_webhook(
            session,
            name,
            body,
            signature,
            SECRET[name] if secret == "default" else secret,
            utcnow(),
        )
        session.commit()
        return outcome
    finally:
        session.close()


def db_payment(name: str, gateway_id: str, status: str = "PENDING", amount: int = 5_000) -> int:
    with session_scope() as session:
        return int(
            session.execute(
                insert(Payment)
                .values(
                    gateway=name,
                    gateway_payment_id=gateway_id,
                    amount=amount,
                    currency=CURRENCY[name],
                    status=status,
                )
                .returning(Payment.id)
            ).scalar_one()
        )


def captured(sim: Any, name: str, status: str | None = None) -> tuple[str, int]:
    gateway_id = sim.add_payment(
        name, amount=5_000, currency=CURRENCY[name], status=status or CAPTURED[name]
    )["id"]
    return gateway_id, db_payment(name, gateway_id)


def status_of(payment_id: int) -> str:
    with session_scope() as session:
        return str(session.get(Payment, payment_id).status)


def transitions(payment_id: int) -> int:
    with session_scope() as session:
        return int(
            session.scalar(
                select(func.count()).where(
                    StateTransition.entity == "payments", StateTransition.entity_id == payment_id
                )
            )
        )


@pytest.mark.parametrize("name", GATEWAYS)
def test_a_valid_event_applies_once_and_a_duplicate_does_nothing(
    committed: Engine, sim: Any, name: str
) -> None:
    gateway_id, payment_id = captured(sim, name)
    body = sim.webhook_event(name, CAPTURE_EVENT[name], gateway_id)
    assert deliver(name, body, sign(name, body)) == "applied"
    assert status_of(payment_id) == "COMPLETED"
    # The gateway delivers again (Stripe signs each delivery anew): acknowledged, no effect.
    assert deliver(name, body, sign(name, body)) == "duplicate"
    assert transitions(payment_id) == 1
    with session_scope() as session:
        event = session.execute(select(WebhookEvent)).scalar_one()
    assert (event.provider, event.entity_id, event.outcome) == (name, gateway_id, "applied")
    if name == "razorpay":
        assert event.event_id == f"payment.captured:{gateway_id}"
    else:
        assert event.event_id == json.loads(body)["id"]


@pytest.mark.parametrize("name", GATEWAYS)
def test_a_tampered_body_is_rejected_as_a_security_event(
    committed: Engine, sim: Any, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    gateway_id, payment_id = captured(sim, name, status=FAILED[name])
    honest = sim.webhook_event(name, FAIL_EVENT[name], gateway_id)
    signature = sign(name, honest)
    forged = honest.replace(FAILED[name], CAPTURED[name])
    assert forged != honest
    with (
        caplog.at_level(logging.WARNING, logger="backstop.security"),
        pytest.raises(WebhookSignatureError, match="signature does not match"),
    ):
        deliver(name, forged, signature)
    assert status_of(payment_id) == "PENDING"
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(WebhookEvent)) == 0
    (record,) = [r for r in caplog.records if r.name == "backstop.security"]
    assert record.getMessage() == "webhook.signature_rejected" and record.provider == name
    logged = caplog.text + repr(record.__dict__)
    assert SECRET[name] not in logged and gateway_id not in logged and forged not in logged


def test_a_stale_stripe_signature_is_rejected_and_a_fresh_one_accepted(
    committed: Engine, sim: Any
) -> None:
    gateway_id, payment_id = captured(sim, "stripe")
    body = sim.webhook_event("stripe", "payment_intent.succeeded", gateway_id)
    old = int(time.time()) - 301
    with pytest.raises(WebhookSignatureError, match="tolerance"):
        deliver("stripe", body, sign("stripe", body, at=old))
    assert status_of(payment_id) == "PENDING"
    assert deliver("stripe", body, sign("stripe", body)) == "applied"


def test_a_replayed_razorpay_delivery_is_a_duplicate(committed: Engine, sim: Any) -> None:
    gateway_id, payment_id = captured(sim, "razorpay")
    body = sim.webhook_event("razorpay", "payment.captured", gateway_id)
    signature = sign("razorpay", body)
    assert deliver("razorpay", body, signature) == "applied"
    # Razorpay signs no timestamp: the same body and signature sent again a day later is
    # recognised by the event it is about, and changes nothing.
    assert deliver("razorpay", body, signature) == "duplicate"
    assert transitions(payment_id) == 1


def test_malformed_signatures_and_missing_secrets_are_refused(committed: Engine, sim: Any) -> None:
    gateway_id, _ = captured(sim, "stripe")
    body = sim.webhook_event("stripe", "payment_intent.succeeded", gateway_id)
    with pytest.raises(WebhookSignatureError, match="malformed"):
        deliver("stripe", body, "v1=deadbeef")
    with pytest.raises(WebhookSignatureError):
        deliver("razorpay", body, "é" * 64)  # not even ASCII
    with pytest.raises(WebhookNotConfigured, match="STRIPE_WEBHOOK_SECRET"):
        deliver("stripe", body, sign("stripe", body), secret=None)
    not_json = "not json"
    with pytest.raises(MalformedWebhook):
        deliver("razorpay", not_json, sign("razorpay", not_json))


@pytest.mark.parametrize("name", GATEWAYS)
def test_the_same_event_delivered_twice_at_once_applies_once(
    committed: Engine, sim: Any, name: str
) -> None:
    gateway_id, payment_id = captured(sim, name)
    body = sim.webhook_event(name, CAPTURE_EVENT[name], gateway_id)
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def receive() -> None:
        barrier.wait()
        outcomes.append(deliver(name, body, sign(name, body)))

    threads = [threading.Thread(target=receive) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["applied", "duplicate", "duplicate", "duplicate"]
    assert transitions(payment_id) == 1


@pytest.mark.parametrize("name", GATEWAYS)
def test_a_failure_for_a_completed_payment_changes_nothing_and_alerts(
    committed: Engine, sim: Any, name: str
) -> None:
    gateway_id = sim.add_payment(name, amount=5_000, currency=CURRENCY[name], status=FAILED[name])[
        "id"
    ]
    payment_id = db_payment(name, gateway_id, status="COMPLETED")
    body = sim.webhook_event(name, FAIL_EVENT[name], gateway_id)
    assert deliver(name, body, sign(name, body)) == "backwards"
    assert status_of(payment_id) == "COMPLETED"
    with session_scope() as session:
        assert session.scalars(select(Notification.template)).all() == ["alert.webhook_conflict"]


@pytest.mark.parametrize("name", GATEWAYS)
def test_a_refund_event_may_arrive_before_we_recorded_the_refund(
    committed: Engine, sim: Any, name: str
) -> None:
    gateway_id, payment_id = captured(sim, name)
    key = "bkr-1-0123456789abcdef"
    with session_scope() as session:
        refund_id = session.execute(
            insert(Refund)
            .values(
                payment_id=payment_id,
                amount=1_000,
                currency=CURRENCY[name],
                idempotency_key=key,
                attempts=1,
            )
            .returning(Refund.id)
        ).scalar_one()
    reference = {"backstop_refund_id": str(refund_id), "backstop_idempotency_key": key}
    state = sim
    with state._lock:  # the refund our submission made, whose response is still on its way
        refund = state._create_refund(
            name,
            state._payments[name][gateway_id],
            1_000,
            notes=reference,
            receipt=None,
            reason=None,
            key=key,
        )
    sim.settle_refund(refund.id, PROCESSED[name])
    body = sim.webhook_event(name, REFUND_EVENT[name], refund.id)
    assert deliver(name, body, sign(name, body)) == "applied"
    with session_scope() as session:
        row = session.get(Refund, refund_id)
        assert (row.status, row.gateway_refund_id) == ("COMPLETED", refund.id)

    # An older attempt's refund (another key) says nothing about the current attempt.
    with state._lock:
        stale = state._create_refund(
            name,
            state._payments[name][gateway_id],
            500,
            notes={**reference, "backstop_idempotency_key": "bkr-1-older000000000"},
            receipt=None,
            reason=None,
            key="bkr-1-older000000000",
        )
    body = sim.webhook_event(name, REFUND_EVENT[name], stale.id)
    assert deliver(name, body, sign(name, body)) == "ignored"


def test_the_replay_precheck_finds_every_recorded_event_in_one_look(
    committed: Engine, sim: Any
) -> None:
    """Dead letters of webhook deliveries replayed in bulk: each one whose event is already
    recorded is unnecessary; the rest (and what does not parse) are replayed."""
    recorded = {}
    for name in GATEWAYS:
        gateway_id, _ = captured(sim, name)
        recorded[name] = sim.webhook_event(name, CAPTURE_EVENT[name], gateway_id)
        assert deliver(name, recorded[name], sign(name, recorded[name])) == "applied"
    fresh_id, _ = captured(sim, "stripe")
    fresh = sim.webhook_event("stripe", CAPTURE_EVENT["stripe"], fresh_id)
    payloads = [
        {"provider": "razorpay", "body": recorded["razorpay"], "signature": "s"},
        {"provider": "stripe", "body": fresh, "signature": "s"},
        {"provider": "stripe", "body": recorded["stripe"], "signature": "s"},
        {"provider": "stripe", "body": "{not json", "signature": "s"},
        {"provider": "paypal", "body": "{}", "signature": "s"},
    ]
    with session_scope() as session:
        answers = events_not_recorded(session, payloads, "ops:alice")
    done = "the event is already recorded"
    assert answers == [done, None, done, None, None]
