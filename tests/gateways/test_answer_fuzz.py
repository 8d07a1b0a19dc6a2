"""Odd answers from the gateways, through the official SDKs over HTTP: the simulator answers
each call as usual, then Hypothesis reshapes the body (fields dropped, nulled, given the wrong
type, fields added, the whole body replaced). Whatever arrives, an adapter returns what the
gateway said or raises one of the three sorted kinds, naming what it could not read; a refund
creation that got an answer it cannot read is an unknown outcome, never a failure."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gateways.test_adapters import paid, request
from workers.gateways.base import (
    GatewayPayment,
    GatewayPermanent,
    GatewayRefund,
    GatewayTransient,
    OutcomeUnknown,
)

SORTED = (GatewayTransient, GatewayPermanent, OutcomeUnknown)
ODD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
# The endpoints each adapter call reads the answers of.
ENDPOINTS = {
    ("razorpay", "submit_refund"): "razorpay.refund.create",
    ("razorpay", "find_refund"): "razorpay.payment.refunds",
    ("razorpay", "fetch_refund"): "razorpay.refund.fetch",
    ("razorpay", "fetch_payment"): "razorpay.payment.fetch",
    ("razorpay", "payment_page"): "razorpay.payment.list",
    ("stripe", "submit_refund"): "stripe.refund.create",
    ("stripe", "find_refund"): "stripe.refund.list",
    ("stripe", "fetch_refund"): "stripe.refund.fetch",
    ("stripe", "fetch_payment"): "stripe.payment_intent.fetch",
    ("stripe", "payment_page"): "stripe.payment_intent.list",
}
FUZZ = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Choices:
    """Every choice a reshape makes, drawn up front in the test's thread (the simulator calls
    the transform from its own), taken in turn; Hypothesis shrinks them as usual."""

    def __init__(self, data: st.DataObject) -> None:
        self.picks = data.draw(st.lists(st.integers(0, 99), min_size=64, max_size=64))
        self.odd = data.draw(st.lists(ODD, min_size=8, max_size=8))
        self.names = data.draw(st.lists(st.text(min_size=1, max_size=6), min_size=4, max_size=4))
        self.turn = 0

    def pick(self, n: int) -> int:
        self.turn += 1
        return self.picks[self.turn % len(self.picks)] % n

    def odd_value(self) -> Any:
        return self.odd[self.pick(len(self.odd))]


def reshaped(value: Any, choices: Choices, depth: int = 0) -> Any:
    """`value` with some of its parts dropped, nulled, retyped or added to."""
    if isinstance(value, dict) and depth < 4:
        out: dict[str, Any] = {}
        for key, item in value.items():
            change = choices.pick(6)  # 0-2 keep, 3 drop, 4 odd value, 5 reshape inside
            if change <= 2:
                out[key] = item
            elif change == 4:
                out[key] = choices.odd_value()
            elif change == 5:
                out[key] = reshaped(item, choices, depth + 1)
        if choices.pick(2):
            out[choices.names[choices.pick(4)]] = choices.odd_value()
        return out
    if isinstance(value, list) and depth < 4:
        return [reshaped(item, choices, depth + 1) for item in value if choices.pick(3)]
    return value if choices.pick(2) else choices.odd_value()


def odd_answers(choices: Choices) -> Callable[[Any], Any]:
    def transform(body: Any) -> Any:
        pick = choices.pick(20)
        if pick == 0:  # now and then, another body altogether
            return choices.odd_value()
        if pick == 1:  # or one that is not JSON: truncated, or a proxy's page
            return b'{"id": "rfnd_' if choices.pick(2) else b"<html>502 Bad Gateway</html>"
        return reshaped(body, choices)

    return transform


def call(gateway: Any, name: str, what: str, payment: str, made: GatewayRefund) -> Any:
    if what == "submit_refund":  # a new attempt, so that the creation reaches the gateway
        return gateway.submit_refund(request(payment, name, key="bkr-1-bbbbccccdddd"))
    if what == "find_refund":
        return gateway.find_refund(request(payment, name))
    if what == "fetch_refund":
        return gateway.fetch_refund(payment, made.id)
    if what == "fetch_payment":
        return gateway.fetch_payment(payment)
    page = gateway.payment_page(datetime.now(UTC) - timedelta(days=1), datetime.now(UTC), None)
    page.columns()  # what reconciliation reads of a page
    return page.items


@pytest.mark.parametrize("name", ["razorpay", "stripe"])
@pytest.mark.parametrize(
    "what", ["submit_refund", "find_refund", "fetch_refund", "fetch_payment", "payment_page"]
)
@FUZZ
@given(data=st.data())
def test_every_answer_is_read_or_sorted(
    sim: Any, gateways: dict[str, Any], name: str, what: str, data: st.DataObject
) -> None:
    sim.reset()
    gateway = gateways[name]
    payment = paid(sim, name)
    made = gateway.submit_refund(request(payment, name))  # for the lookups to find
    sim.reshape(ENDPOINTS[(name, what)], odd_answers(Choices(data)))
    try:
        result = call(gateway, name, what, payment, made)
    except SORTED as error:
        assert str(error)
        if what == "submit_refund":  # the gateway answered 200: the refund may well exist
            assert isinstance(error, OutcomeUnknown), repr(error)
        return
    if what in ("submit_refund", "fetch_refund"):
        assert isinstance(result, GatewayRefund)
        assert isinstance(result.amount, int) and isinstance(result.currency, str)
    elif what == "find_refund":
        assert result is None or isinstance(result, GatewayRefund)
    elif what == "fetch_payment":
        assert isinstance(result, GatewayPayment)
    else:
        assert all(isinstance(item, GatewayPayment) for item in result)


def test_a_listing_whose_items_carry_no_status_still_finds_our_refund(
    sim: Any, gateways: dict[str, Any]
) -> None:
    """Razorpay's published examples of a payment's refunds list items without `status`: the
    refund exists, so it must not be sent again; its status is asked for by id later."""
    payment = paid(sim, "razorpay")
    made = gateways["razorpay"].submit_refund(request(payment, "razorpay"))

    def no_status(body: Any) -> Any:
        items = [{k: v for k, v in item.items() if k != "status"} for item in body["items"]]
        return {**body, "items": items}

    sim.reshape("razorpay.payment.refunds", no_status)
    found = gateways["razorpay"].find_refund(request(payment, "razorpay"))
    assert found is not None and (found.id, found.status) == (made.id, "PROCESSING")


@pytest.mark.parametrize("name", ["razorpay", "stripe"])
@pytest.mark.parametrize("body", [b'{"id": "rfnd_', b"<html>Bad Gateway</html>"])
def test_a_refund_answered_with_a_body_that_is_not_json_is_an_unknown_outcome(
    sim: Any, gateways: dict[str, Any], name: str, body: bytes
) -> None:
    """A 200 whose body is cut short or is a proxy's page: the refund was made; calling it a
    refusal would fail the attempt and let a new key refund the customer again."""
    payment = paid(sim, name)
    sim.reshape(ENDPOINTS[(name, "submit_refund")], lambda _: body)
    with pytest.raises(OutcomeUnknown):
        gateways[name].submit_refund(request(payment, name))
    assert sim.effects()["refunds_created"] == 1


@pytest.mark.parametrize("name", ["razorpay", "stripe"])
def test_a_field_missing_is_named(sim: Any, gateways: dict[str, Any], name: str) -> None:
    payment = paid(sim, name)
    endpoint = ENDPOINTS[(name, "fetch_payment")]
    sim.reshape(endpoint, lambda body: {k: v for k, v in body.items() if k != "amount"})
    with pytest.raises(GatewayTransient, match="'amount'"):
        gateways[name].fetch_payment(payment)
    sim.reshape(endpoint, lambda body: {**body, "amount": "1000"})
    with pytest.raises(GatewayTransient, match="'amount' is str"):
        gateways[name].fetch_payment(payment)
