"""The gateway adapters: the official SDKs over real HTTP to the simulator, every outcome sorted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import stripe

from tests.workers.factories import CAPTURED, CURRENCY
from workers.gateways.base import (
    GatewayPermanent,
    GatewayTransient,
    OutcomeUnknown,
    RefundRequest,
    payment_status,
    refund_status,
)
from workers.gateways.stripe import STRIPE_API_VERSION

GATEWAYS = ["razorpay", "stripe"]


def paid(sim: Any, gateway: str, amount: int = 50_000) -> str:
    return sim.add_payment(
        gateway, amount=amount, currency=CURRENCY[gateway], status=CAPTURED[gateway]
    )["id"]


def request(
    payment_id: str, gateway: str, key: str = "bkr-1-aaaabbbbcccc", amount: int = 1_000
) -> RefundRequest:
    return RefundRequest(
        refund_id=1,
        idempotency_key=key,
        gateway_payment_id=payment_id,
        amount=amount,
        currency=CURRENCY[gateway],
        reason="cancelled",
    )


@pytest.mark.parametrize("name", GATEWAYS)
def test_refund_happy_path_and_lookups(sim: Any, gateways: dict[str, Any], name: str) -> None:
    gateway = gateways[name]
    payment = paid(sim, name)
    refund = gateway.submit_refund(request(payment, name))
    assert (refund.status, refund.amount, refund.currency) == ("COMPLETED", 1_000, CURRENCY[name])
    assert refund.idempotency_key == "bkr-1-aaaabbbbcccc"
    assert gateway.fetch_refund(payment, refund.id) == refund
    assert gateway.find_refund(request(payment, name)) == refund
    assert gateway.find_refund(request(payment, name, key="bkr-1-someotherkey1")) is None
    fetched = gateway.fetch_payment(payment)
    assert (fetched.id, fetched.amount) == (payment, 50_000)


@pytest.mark.parametrize("name", GATEWAYS)
def test_same_key_same_body_is_the_same_refund(
    sim: Any, gateways: dict[str, Any], name: str
) -> None:
    payment = paid(sim, name)
    first = gateways[name].submit_refund(request(payment, name))
    again = gateways[name].submit_refund(request(payment, name))
    assert again.id == first.id
    assert sim.effects()["by_idempotency_key"] == {"bkr-1-aaaabbbbcccc": 1}


@pytest.mark.parametrize("name", GATEWAYS)
def test_same_key_different_body_is_an_unknown_outcome(
    sim: Any, gateways: dict[str, Any], name: str
) -> None:
    """The gateway refuses a key it saw with another body (Stripe's idempotency_error): that
    can only mean the key was used before, so a refund may exist. Never a failure, which
    would let a new attempt with a new key refund twice; asking the gateway tells."""
    payment = paid(sim, name)
    made = gateways[name].submit_refund(request(payment, name))
    with pytest.raises(OutcomeUnknown, match="HTTP 400"):
        gateways[name].submit_refund(request(payment, name, amount=2_000))
    assert gateways[name].find_refund(request(payment, name, amount=2_000)) == made


@pytest.mark.parametrize("name", GATEWAYS)
@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("429", GatewayTransient),  # not processed
        ("503", GatewayTransient),
        ("500", OutcomeUnknown),  # a server error after the request arrived: it may have
        ("502", OutcomeUnknown),  # been processed
        ("timeout", OutcomeUnknown),
        ("lost", OutcomeUnknown),
    ],
)
def test_faults_sort_into_transient_or_unknown(
    sim: Any, gateways: dict[str, Any], name: str, kind: str, expected: type
) -> None:
    payment = paid(sim, name)
    sim.add_fault(f"{name}.refund.create", kind, hang_seconds=1.5, remaining=1)
    with pytest.raises(expected):
        gateways[name].submit_refund(request(payment, name))
    made = sim.effects()["refunds_created"]
    assert made == (1 if kind == "lost" else 0)
    # The same attempt again: made exactly once either way.
    gateways[name].submit_refund(request(payment, name))
    assert sim.effects()["by_idempotency_key"] == {"bkr-1-aaaabbbbcccc": 1}


@pytest.mark.parametrize("name", GATEWAYS)
def test_a_timeout_on_a_read_is_transient_not_unknown(
    sim: Any, gateways: dict[str, Any], name: str
) -> None:
    payment = paid(sim, name)
    endpoint = "razorpay.payment.fetch" if name == "razorpay" else "stripe.payment_intent.fetch"
    sim.add_fault(endpoint, "timeout", hang_seconds=1.5, remaining=1)
    with pytest.raises(GatewayTransient):
        gateways[name].fetch_payment(payment)


@pytest.mark.parametrize("name", GATEWAYS)
def test_refusals_are_permanent(sim: Any, gateways: dict[str, Any], name: str) -> None:
    payment = paid(sim, name, amount=500)
    with pytest.raises(GatewayPermanent):  # more than the payment
        gateways[name].submit_refund(request(payment, name, amount=1_000))
    with pytest.raises(GatewayPermanent):  # no such payment
        gateways[name].submit_refund(request("pay_nope" if name == "razorpay" else "pi_nope", name))


def test_bad_credentials_are_permanent(sim: Any, simulator_server: Any) -> None:
    from workers.gateways.razorpay import RazorpayGateway
    from workers.gateways.stripe import StripeGateway

    for gateway, name in (
        (RazorpayGateway("rzp_test_x", "wrong", simulator_server.url, 1), "razorpay"),
        (StripeGateway("sk_test_wrong", simulator_server.url, 1), "stripe"),
    ):
        with pytest.raises(GatewayPermanent, match="HTTP 401"):
            gateway.fetch_payment(paid(sim, name))


def test_a_gateway_that_is_down_is_transient() -> None:
    from workers.gateways.razorpay import RazorpayGateway
    from workers.gateways.stripe import StripeGateway

    down = "http://127.0.0.1:9"  # the discard port: nothing listens there
    with pytest.raises(GatewayTransient):
        RazorpayGateway("k", "s", down, 1).fetch_payment("pay_1")
    with pytest.raises((GatewayTransient, OutcomeUnknown)):
        StripeGateway("sk_test_k", down, 1).fetch_payment("pi_1")


@pytest.mark.parametrize(
    ("name", "raw", "ours"),
    [
        ("razorpay", "processed", "COMPLETED"),
        ("razorpay", "pending", "PROCESSING"),
        ("razorpay", "failed", "FAILED"),
        ("stripe", "succeeded", "COMPLETED"),
        ("stripe", "pending", "PROCESSING"),
        ("stripe", "requires_action", "PROCESSING"),
        ("stripe", "failed", "FAILED"),
        ("stripe", "canceled", "FAILED"),
    ],
)
def test_refund_status_mapping_over_http(
    sim: Any, gateways: dict[str, Any], name: str, raw: str, ours: str
) -> None:
    sim.set_refund_outcome(name, raw)
    refund = gateways[name].submit_refund(request(paid(sim, name), name))
    assert (refund.raw_status, refund.status) == (raw, ours)
    assert refund_status(name, raw) == ours


@pytest.mark.parametrize(
    ("name", "raw", "ours"),
    [
        ("razorpay", "captured", "COMPLETED"),
        ("razorpay", "authorized", "AUTHORIZED"),
        ("razorpay", "failed", "FAILED"),
        ("razorpay", "created", "PENDING"),
        ("stripe", "succeeded", "COMPLETED"),
        ("stripe", "requires_capture", "AUTHORIZED"),
        ("stripe", "canceled", "FAILED"),
        ("stripe", "processing", "PENDING"),
        ("stripe", "requires_payment_method", "PENDING"),
    ],
)
def test_payment_status_mapping_over_http(
    sim: Any, gateways: dict[str, Any], name: str, raw: str, ours: str
) -> None:
    payment = sim.add_payment(name, amount=100, currency=CURRENCY[name], status=raw)["id"]
    fetched = gateways[name].fetch_payment(payment)
    assert (fetched.raw_status, fetched.status) == (raw, ours)
    assert payment_status(name, raw) == ours


@pytest.mark.parametrize("name", GATEWAYS)
def test_payment_listing_pages_through_a_window(
    sim: Any, gateways: dict[str, Any], name: str
) -> None:
    start = datetime(2026, 5, 1, tzinfo=UTC)
    inside = [int((start + timedelta(minutes=i)).timestamp()) for i in range(230)]
    sim.add_payments(
        name,
        [
            {"amount": 100 + i, "currency": CURRENCY[name], "status": CAPTURED[name], "created": at}
            for i, at in enumerate(inside)
        ],
    )
    sim.add_payments(
        name,
        [
            {
                "amount": 1,
                "currency": CURRENCY[name],
                "status": CAPTURED[name],
                "created": int((start + timedelta(days=1)).timestamp()),
            }
        ],
    )
    pages, cursor = [], None
    while True:
        page = gateways[name].payment_page(start, start + timedelta(days=1), cursor)
        pages.append(page.items)
        if page.cursor is None:
            break
        cursor = page.cursor
    assert [len(page) for page in pages] == [100, 100, 30]
    assert len({payment.id for page in pages for payment in page}) == 230


def test_the_stripe_adapter_targets_the_api_version_of_its_sdk() -> None:
    # A new stripe-python major targets a new API version: adopt it on purpose, here.
    assert stripe.api_version == STRIPE_API_VERSION


def test_every_stripe_request_names_the_adapters_api_version(
    sim: Any, gateways: dict[str, Any]
) -> None:
    payment = paid(sim, "stripe")
    refund = gateways["stripe"].submit_refund(request(payment, "stripe"))
    gateways["stripe"].fetch_refund(payment, refund.id)

    assert sim.stats()["stripe_versions"] == {STRIPE_API_VERSION: 2}
