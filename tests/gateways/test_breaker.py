"""The circuit breaker per gateway: state shared through the real Redis, as between worker
processes; calls through the real SDKs to the simulator."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis as redis_lib

from workers.gateways.base import CircuitOpen, GatewayPermanent, GatewayTransient, RefundRequest
from workers.gateways.breaker import Breakers, GuardedGateway


def guarded(gateways: dict[str, Any], redis: redis_lib.Redis, reset: float = 1.0) -> Any:
    breakers = Breakers("razorpay", fail_max=3, reset_seconds=reset, redis=redis)
    return GuardedGateway(gateways["razorpay"], breakers)


def request(payment: str, amount: int = 100) -> RefundRequest:
    return RefundRequest(
        refund_id=7,
        idempotency_key="bkr-7-0123456789",
        amount=amount,
        gateway_payment_id=payment,
        currency="INR",
        reason=None,
    )


def test_failures_in_one_process_open_the_breaker_for_all(
    sim: Any, gateways: dict[str, Any], redis: redis_lib.Redis
) -> None:
    payment = sim.add_payment("razorpay", amount=1_000, currency="INR")["id"]
    one, other = guarded(gateways, redis), guarded(gateways, redis)  # two "processes"
    sim.add_fault("razorpay.refund.create", "503")
    for _ in range(3):
        with pytest.raises(GatewayTransient):
            one.submit_refund(request(payment))
    assert other.state() == "open" and 0 < other.open_for() <= 1.0
    calls = sim.stats()["requests"]["razorpay.refund.create"]
    with pytest.raises(CircuitOpen):
        other.submit_refund(request(payment))
    assert sim.stats()["requests"]["razorpay.refund.create"] == calls  # nothing was sent
    # After the reset timeout one trial call goes through; its success closes the breaker.
    sim.clear_faults()
    time.sleep(1.1)
    assert other.open_for() == 0
    assert other.submit_refund(request(payment)).status == "COMPLETED"
    assert one.state() == "closed"


def test_refusals_do_not_open_the_breaker(
    sim: Any, gateways: dict[str, Any], redis: redis_lib.Redis
) -> None:
    gateway = guarded(gateways, redis)
    payment = sim.add_payment("razorpay", amount=100, currency="INR")["id"]
    for _ in range(5):
        with pytest.raises(GatewayPermanent):
            gateway.submit_refund(request(payment, amount=10_000))
    assert gateway.state() == "closed"


def test_a_lost_response_that_trips_the_breaker_is_still_reported_as_unknown(
    sim: Any, gateways: dict[str, Any], redis: redis_lib.Redis
) -> None:
    from workers.gateways.base import OutcomeUnknown

    gateway = guarded(gateways, redis)
    payment = sim.add_payment("razorpay", amount=1_000, currency="INR")["id"]
    sim.add_fault("razorpay.refund.create", "503", remaining=2)
    for _ in range(2):
        with pytest.raises(GatewayTransient):
            gateway.submit_refund(request(payment))
    sim.add_fault("razorpay.refund.create", "lost", hang_seconds=1.5, remaining=1)
    with pytest.raises(OutcomeUnknown):  # the tripping call: not masked as "nothing sent"
        gateway.submit_refund(request(payment))
    assert gateway.state() == "open"


def test_calls_through_a_closed_breaker_run_at_once_and_still_count(
    sim: Any, gateways: dict[str, Any], redis: redis_lib.Redis
) -> None:
    """pybreaker holds a lock for the whole of a call made through it; the guard must not, or
    threads of one worker would talk to the gateway one at a time."""
    import threading

    gateway = guarded(gateways, redis)
    payment = sim.add_payment("razorpay", amount=1_000, currency="INR")["id"]
    sim.add_fault("razorpay.payment.fetch", "latency", latency_ms=400)
    barrier = threading.Barrier(4)
    spans: list[tuple[float, float]] = []

    def fetch() -> None:
        barrier.wait()
        started = time.monotonic()
        gateway.fetch_payment(payment)
        spans.append((started, time.monotonic()))

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(spans) == 4
    assert max(start for start, _ in spans) < min(end for _, end in spans)  # all in flight at once
    # Failures made at once still count, and still open the breaker for everyone.
    sim.clear_faults()
    sim.add_fault("razorpay.payment.fetch", "503")
    errors: list[Exception] = []

    def failing() -> None:
        try:
            gateway.fetch_payment(payment)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=failing) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 3 and all(isinstance(e, GatewayTransient) for e in errors)
    assert gateway.state() == "open"


def test_without_redis_a_breaker_keeps_its_own_state_and_knows_when_it_opened(
    sim: Any, gateways: dict[str, Any]
) -> None:
    breakers = Breakers("razorpay", fail_max=2, reset_seconds=30, redis=None)
    gateway = GuardedGateway(gateways["razorpay"], breakers)
    payment = sim.add_payment("razorpay", amount=100, currency="INR")["id"]
    sim.add_fault("razorpay.refund.create", "503")
    assert gateway.open_for() == 0
    for _ in range(2):
        with pytest.raises(GatewayTransient):
            gateway.submit_refund(request(payment))
    assert gateway.state() == "open" and 29 < gateway.open_for() <= 30
    other = GuardedGateway(
        gateways["razorpay"], Breakers("razorpay", fail_max=2, reset_seconds=30, redis=None)
    )
    assert other.state() == "closed" and other.open_for() == 0
