"""The demo workload `make run` seeds into an empty database, so a newcomer sees holds expire."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from config import get_settings
from config.celery import QUEUES
from workers.db import transition
from workers.devtools.sandbox import SandboxState
from workers.devtools.simulator import SimulatorState
from workers.messaging.enqueue import enqueue_after_commit
from workers.models import BookingHold, Notification, Payment, PushToken, Refund


def seed(session: Session, now: datetime, *, holds: int = 24) -> list[int]:
    """Holds expiring over the next minute: every other one also gets a `holds.expire` task as
    a booking service would send; the sweep finds the rest. A quarter are confirmed at once by
    "another service" and must never expire. Returns the new hold ids; seeds nothing if the
    database already has holds."""
    if session.scalar(select(func.count()).select_from(BookingHold)):
        return []
    rows = [
        {
            "resource_id": f"court-{index % 4 + 1}",
            "user_id": f"demo-user-{index}",
            "start_time": now + timedelta(days=1, hours=index),
            "end_time": now + timedelta(days=1, hours=index + 1),
            "expires_at": now + timedelta(seconds=10 + index * 2),
        }
        for index in range(holds)
    ]
    ids = list(session.execute(insert(BookingHold).returning(BookingHold.id), rows).scalars())
    confirmed = ids[3::4]
    session.execute(
        update(BookingHold)
        .where(BookingHold.id.in_(confirmed), BookingHold.status == "ACTIVE")
        .values(status="CONFIRMED", updated_at=now)
    )
    for index, hold_id in enumerate(ids):
        if index % 2 == 0 and hold_id not in confirmed:
            enqueue_after_commit(
                session,
                "holds.expire",
                {"hold_id": hold_id},
                countdown=(rows[index]["expires_at"] - now).total_seconds(),
            )
    # A buggy caller's message (the id as a string): it lands in the dead-letter queue, for
    # `backstop dlq list` / `dlq replay ID --payload '{"hold_id": N}'` to show and fix.
    enqueue_after_commit(session, "holds.expire", {"hold_id": str(ids[0])})
    return ids


def prune_embedded_broker(folder: Path) -> int:
    """Forget what an earlier `make run` left in the filesystem broker besides tasks.

    kombu's filesystem transport keeps fanout bindings in files, so the event queue of a Flower
    that has gone would go on receiving every task event, forever. With nothing running, drop
    all bindings (workers and producers declare theirs again) and every message not on one of
    the task queues. Tasks still waiting are kept. Returns the messages removed.
    """
    shutil.rmtree(folder / "control", ignore_errors=True)
    removed = 0
    for path in (folder / "messages").glob("*.msg"):
        queue = path.name.partition(".")[2].removesuffix(".msg")
        if queue not in QUEUES:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


# The demo's payments, known to the simulator `make run` starts and to the demo's refund rows.
DEMO_PAYMENTS = (
    ("razorpay", "pay_DemoBooking0001", 250_000, "INR", "captured"),
    ("stripe", "pi_DemoBooking0001", 4_900, "USD", "succeeded"),
)


def seed_simulator(state: SimulatorState) -> None:
    """The demo's gateway side: its payments, and one failure each for the first refund calls:
    Razorpay answers 503 (nothing happened), Stripe makes the refund but the response is lost
    (the worker times out). Both are retried with the same key and made exactly once."""
    for gateway, payment_id, amount, currency, status in DEMO_PAYMENTS:
        state.add_payment(gateway, id=payment_id, amount=amount, currency=currency, status=status)
    noon = int(yesterday_noon().timestamp())
    for gateway, payment_id, amount, currency, status, _, _ in RECONCILIATION:
        if status is not None:
            state.add_payment(
                gateway,
                id=payment_id,
                amount=amount,
                currency=currency,
                status=status,
                created=noon,
            )
    for gateway, payment_id, amount, currency, status in IN_FLIGHT:
        state.add_payment(gateway, id=payment_id, amount=amount, currency=currency, status=status)
    state.add_fault("razorpay.refund.create", "503", remaining=1)
    state.add_fault(
        "stripe.refund.create",
        "lost",
        remaining=1,
        hang_seconds=get_settings().GATEWAY_TIMEOUT_SECONDS + 1,
    )


def seed_refunds(session: Session, now: datetime) -> list[int]:
    """One refund per demo payment, submitted as the booking service would; nothing if the
    database already has refunds. The first try of each fails, and the retry completes it."""
    if session.scalar(select(func.count()).select_from(Refund)):
        return []
    ids = []
    for gateway, payment_id, amount, currency, _ in DEMO_PAYMENTS:
        payment = session.execute(
            insert(Payment)
            .values(
                gateway=gateway,
                gateway_payment_id=payment_id,
                amount=amount,
                currency=currency,
                status="COMPLETED",
            )
            .returning(Payment.id)
        ).scalar_one()
        refund = session.execute(
            insert(Refund)
            .values(
                payment_id=payment,
                amount=amount // 2,
                currency=currency,
                reason="demo: booking cancelled",
            )
            .returning(Refund.id)
        ).scalar_one()
        # A few seconds, so the simulator `make run` starts is listening by then.
        enqueue_after_commit(session, "refunds.submit", {"refund_id": refund}, countdown=8)
        ids.append(refund)
    ids.append(seed_refund_in_review(session, payment, currency, now))
    return ids


def seed_refund_in_review(session: Session, payment: int, currency: str, now: datetime) -> int:
    """A refund the gateway refused on every attempt, which the retry job has given up on: it
    waits in manual review for a person (the console's Refunds page)."""
    attempts = get_settings().REFUND_MAX_ATTEMPTS
    refused = "stripe refused the refund (HTTP 400): amount exceeds the charge's refundable amount"
    refund = session.execute(
        insert(Refund)
        .values(
            payment_id=payment,
            amount=999_900,
            currency=currency,
            reason="demo: refund larger than the charge",
            created_at=now - timedelta(days=1, hours=2),
            updated_at=now - timedelta(days=1, hours=2),
        )
        .returning(Refund.id)
    ).scalar_one()
    transition(
        session,
        "refunds",
        refund,
        "FAILED",
        actor="refunds.submit",
        reason=refused,
        now=now - timedelta(hours=2),
        values={"attempts": attempts, "last_error": refused, "idempotency_key": f"demo-{refund}-3"},
    )
    session.execute(update(Refund).where(Refund.id == refund).values(requires_manual_review=True))
    return refund


# The demo's notifications, delivered by the local SMS/push sandbox `make run` starts: the SMS
# provider answers 503 once (the SMS is retried with backoff, then sent), the push to the
# user's device goes through, and the push to a token the provider no longer knows ends DEAD
# in the dead-letter queue, the token marked invalid.
DEMO_DEVICE, DEMO_STALE_DEVICE = "demo-device-0001", "demo-device-stale"


def seed_sandbox(state: SandboxState) -> None:
    state.add_fault("sms", "503", remaining=1)
    state.unregister(DEMO_STALE_DEVICE)


def seed_notifications(session: Session, now: datetime) -> list[int]:
    """Three notifications, as `notifications.send` would write them, due in a few seconds
    (so the sandbox is listening by then); nothing if the database already has some."""
    if session.scalar(select(func.count()).select_from(Notification)):
        return []
    # Every demo user has a phone, so the waitlist notices of expired holds are delivered too.
    users = set(session.scalars(select(BookingHold.user_id).distinct())) - {"demo-user-1"}
    session.execute(
        insert(PushToken),
        [{"token": DEMO_DEVICE, "user_id": "demo-user-1"}]
        + [{"token": f"demo-device-{user}", "user_id": user} for user in sorted(users)],
    )
    due = now + timedelta(seconds=8)
    rows = [
        ("sms", "+14155550123", "booking_confirmed"),
        ("push", "user:demo-user-1", "booking_confirmed"),
        ("push", DEMO_STALE_DEVICE, "booking_confirmed"),
    ]
    ids = []
    for channel, recipient, template in rows:
        notification = session.execute(
            insert(Notification)
            .values(
                channel=channel,
                recipient=recipient,
                template=template,
                data={"resource_id": "court-1", "start_time": "tomorrow 18:00"},
                dedupe_key=f"demo:{channel}:{recipient}",
                next_attempt_at=due,
                enqueued_at=now,
            )
            .returning(Notification.id)
        ).scalar_one()
        enqueue_after_commit(
            session, "notifications.deliver", {"notification_id": notification}, countdown=8
        )
        ids.append(notification)
    return ids


# Yesterday's payments as each side has them: (gateway, id, gateway amount, currency, gateway
# status or None when the gateway never saw it, our amount, our status or None when we never
# recorded it). The nightly run `make run` triggers fixes two and flags four for review.
RECONCILIATION = (
    ("razorpay", "pay_DemoRecon00001", 120_000, "INR", "captured", 120_000, "COMPLETED"),
    # The webhook was lost: captured at the gateway, PENDING here. Fixed: COMPLETED.
    ("razorpay", "pay_DemoRecon00002", 80_000, "INR", "captured", 80_000, "PENDING"),
    # Failed at the gateway, COMPLETED here: money never moves backwards, flagged.
    ("razorpay", "pay_DemoRecon00003", 45_000, "INR", "failed", 45_000, "COMPLETED"),
    # Captured for ten times what we recorded: flagged.
    ("razorpay", "pay_DemoRecon00004", 250_000, "INR", "captured", 25_000, "COMPLETED"),
    # A payment we never recorded: flagged.
    ("razorpay", "pay_DemoRecon00005", 9_900, "INR", "captured", None, None),
    # Recorded here, unknown to the gateway: flagged.
    ("razorpay", "pay_DemoRecon00006", None, "INR", None, 60_000, "COMPLETED"),
    # Authorized then captured at the gateway; AUTHORIZED here. Fixed: COMPLETED.
    ("stripe", "pi_DemoRecon00000000000001", 4_900, "USD", "succeeded", 4_900, "AUTHORIZED"),
)
# Paid half an hour ago, still PENDING here: the in-flight janitor moves it on.
IN_FLIGHT = (("stripe", "pi_DemoInFlight0000000001", 2_500, "USD", "succeeded"),)


def yesterday_noon() -> datetime:
    zone = ZoneInfo(get_settings().TIMEZONE)
    today = datetime.now(zone).date()
    return datetime.combine(today - timedelta(days=1), time(12), zone).astimezone(UTC)


def seed_reconciliation(session: Session, now: datetime) -> list[int]:
    """Our side of yesterday's payments and of one stuck payment, then the nightly run and
    the janitor, sent as beat would; nothing if they are already there."""
    known = session.scalar(
        select(func.count()).where(Payment.gateway_payment_id.in_([r[1] for r in RECONCILIATION]))
    )
    if known:
        return []
    noon = yesterday_noon()
    rows = [
        {
            "gateway": gateway,
            "gateway_payment_id": payment_id,
            "amount": amount,
            "currency": currency,
            "status": status,
            "created_at": noon,
            "updated_at": noon,
        }
        for gateway, payment_id, _, currency, _, amount, status in RECONCILIATION
        if status is not None
    ]
    rows += [
        {
            "gateway": gateway,
            "gateway_payment_id": payment_id,
            "amount": amount,
            "currency": currency,
            "status": "PENDING",
            "created_at": now - timedelta(minutes=30),
            "updated_at": now - timedelta(minutes=30),
        }
        for gateway, payment_id, amount, currency, _ in IN_FLIGHT
    ]
    ids = list(session.execute(insert(Payment).returning(Payment.id), rows).scalars())
    # A few seconds, so the simulator `make run` starts is listening by then. The janitor
    # comes later: it too would complete yesterday's stuck payments, the nightly run's fixes.
    enqueue_after_commit(session, "reconciliation.nightly", {}, countdown=10)
    enqueue_after_commit(session, "payments.check_in_flight", {}, countdown=40)
    return ids
