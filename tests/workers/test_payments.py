"""The in-flight payment janitor against the simulator over HTTP: stuck payments move on the
gateway's final answer, on a bounded schedule, each asked about once however many janitors
run at the same moment."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, insert, select

from tests.workers.factories import CAPTURED, CURRENCY
from workers.db import Steps, new_session, session_scope
from workers.models import Notification, Payment
from workers.payments.in_flight import JanitorPolicy, check_in_flight

T0 = datetime(2026, 6, 1, 12, tzinfo=UTC)
POLICY = JanitorPolicy(stuck_after=timedelta(minutes=15), max_attempts=3, batch_size=50)
AUTHORIZED = {"razorpay": "authorized", "stripe": "requires_capture"}
FAILED = {"razorpay": "failed", "stripe": "canceled"}
PENDING = {"razorpay": "created", "stripe": "requires_payment_method"}


def payment(
    sim: Any,
    gateway: str,
    gateway_status: str | None,
    *,
    status: str = "PENDING",
    created_at: datetime = T0 - timedelta(hours=1),
    amount: int = 5_000,
    gateway_amount: int | None = None,
) -> int:
    gateway_id = None
    if gateway_status is not None:
        gateway_id = sim.add_payment(
            gateway,
            amount=gateway_amount or amount,
            currency=CURRENCY[gateway],
            status=gateway_status,
        )["id"]
    with session_scope() as session:
        return int(
            session.execute(
                insert(Payment)
                .values(
                    gateway=gateway,
                    gateway_payment_id=gateway_id,
                    amount=amount,
                    currency=CURRENCY[gateway],
                    status=status,
                    created_at=created_at,
                    updated_at=created_at,
                )
                .returning(Payment.id)
            ).scalar_one()
        )


def janitor(gateways: dict[str, Any], at: datetime = T0) -> Counter[str]:
    session = new_session()
    try:
        return check_in_flight(
            Steps(session), lambda: at, gateways.__getitem__, POLICY, time_budget=30
        )
    finally:
        session.close()


def row(payment_id: int) -> Payment:
    with session_scope() as session:
        return session.get(Payment, payment_id)


def alerts() -> list[str]:
    with session_scope() as session:
        return list(session.scalars(select(Notification.dedupe_key).order_by(Notification.id)))


def test_stuck_payments_move_on_the_gateways_final_answer(
    committed: Engine, sim: Any, gateways: dict[str, Any]
) -> None:
    moved = {}
    for name in ("razorpay", "stripe"):
        moved[name] = {
            "captured": payment(sim, name, CAPTURED[name]),
            "authorized": payment(sim, name, AUTHORIZED[name]),
            "failed": payment(sim, name, FAILED[name], status="AUTHORIZED"),
            "pending": payment(sim, name, PENDING[name]),
            "recent": payment(sim, name, CAPTURED[name], created_at=T0 - timedelta(minutes=5)),
            "no_reference": payment(sim, name, None),
            "final": payment(sim, name, FAILED[name], status="COMPLETED"),
        }
    counts = janitor(gateways)
    for ids in moved.values():
        assert row(ids["captured"]).status == "COMPLETED"
        assert row(ids["authorized"]).status == "AUTHORIZED"
        assert row(ids["failed"]).status == "FAILED"
        assert row(ids["pending"]).status == "PENDING"
        assert row(ids["recent"]).status == "PENDING"  # not stuck yet: the webhook may come
        assert row(ids["no_reference"]).check_attempts == 0  # nothing to ask about
        assert row(ids["final"]).check_attempts == 0  # not in flight: reconciliation's
    assert counts == {"checked": 8, "completed": 2, "authorized": 2, "failed": 2, "unchanged": 2}
    requests = sim.stats()["requests"]
    assert requests["razorpay.payment.fetch"] == requests["stripe.payment_intent.fetch"] == 4


def test_checks_follow_a_doubling_schedule_and_stop_with_one_alert(
    committed: Engine, sim: Any, gateways: dict[str, Any]
) -> None:
    stuck = payment(sim, "razorpay", "created")
    assert janitor(gateways)["checked"] == 1
    first = row(stuck)
    assert first.check_attempts == 1 and first.next_check_at == T0 + timedelta(minutes=15)
    assert janitor(gateways, T0 + timedelta(minutes=10))["checked"] == 0  # not due yet
    assert janitor(gateways, T0 + timedelta(minutes=15))["checked"] == 1
    assert row(stuck).next_check_at == T0 + timedelta(minutes=15 + 30)
    assert alerts() == []
    assert janitor(gateways, T0 + timedelta(minutes=45))["checked"] == 1  # the third and last
    assert row(stuck).check_attempts == 3
    assert alerts() == [f"alert:payment-in-flight:{stuck}"]
    assert janitor(gateways, T0 + timedelta(days=3))["checked"] == 0
    assert sim.stats()["requests"]["razorpay.payment.fetch"] == 3


def test_a_last_check_the_gateway_does_not_answer_still_alerts(
    committed: Engine, sim: Any, gateways: dict[str, Any]
) -> None:
    """The last check is the last: an error there cannot wait for a next check."""
    stuck = payment(sim, "razorpay", "created")
    janitor(gateways)
    janitor(gateways, T0 + timedelta(minutes=15))
    sim.add_fault("razorpay.payment.fetch", "503")
    counts = janitor(gateways, T0 + timedelta(minutes=45))
    assert counts["errors"] == 1 and row(stuck).check_attempts == 3
    assert alerts() == [f"alert:payment-in-flight:{stuck}"]
    assert janitor(gateways, T0 + timedelta(days=3))["checked"] == 0


def test_an_amount_that_differs_is_not_moved_but_alerted(
    committed: Engine, sim: Any, gateways: dict[str, Any]
) -> None:
    odd = payment(sim, "stripe", "succeeded", amount=5_000, gateway_amount=50_000)
    unknown = payment(sim, "razorpay", "created")
    with session_scope() as session:
        session.get(Payment, unknown).gateway_payment_id = "pay_NotAtTheGateway"
    counts = janitor(gateways)
    assert row(odd).status == "PENDING"
    assert counts["amount_mismatch"] == 1 and counts["not_found"] == 1
    assert alerts() == [f"alert:payment-in-flight:{odd}"]


def test_two_janitors_at_the_same_moment_ask_about_each_payment_once(
    committed: Engine, sim: Any, gateways: dict[str, Any]
) -> None:
    ids = [payment(sim, "razorpay", "captured") for _ in range(120)]
    barrier = threading.Barrier(3)
    totals: list[Counter[str]] = []

    def run() -> None:
        barrier.wait()
        totals.append(janitor(gateways))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(total["checked"] for total in totals) == 120
    assert sim.stats()["requests"]["razorpay.payment.fetch"] == 120
    assert {row(payment_id).status for payment_id in ids} == {"COMPLETED"}
