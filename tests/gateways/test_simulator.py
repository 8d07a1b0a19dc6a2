"""The gateway simulator, driven over real HTTP by the official razorpay and stripe SDKs.

No database: these tests use none of the `db`/`committed` fixtures.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import razorpay
import razorpay.errors
import requests
import stripe

from workers.devtools.simulator import SimulatorServer, SimulatorState

KEY_ID, KEY_SECRET, API_KEY = "rzp_test_sim", "sim_secret", "sk_test_sim"
SHORT_TIMEOUT = 0.5  # the client's; faults that hang do so for longer
DAY = 24 * 3600


@pytest.fixture(scope="module")
def server() -> Iterator[SimulatorServer]:
    with SimulatorServer() as running:
        yield running


@pytest.fixture
def state(server: SimulatorServer) -> SimulatorState:
    server.state.reset()
    return server.state


@pytest.fixture
def rzp(server: SimulatorServer) -> razorpay.Client:
    return razorpay.Client(auth=(KEY_ID, KEY_SECRET), base_url=server.url)


def stripe_client(url: str, timeout: float = 5, api_key: str = API_KEY) -> stripe.StripeClient:
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": url},
        http_client=stripe.RequestsClient(timeout=timeout),
        max_network_retries=0,
    )


@pytest.fixture
def stp(server: SimulatorServer) -> stripe.StripeClient:
    return stripe_client(server.url)


@pytest.fixture
def stp_short(server: SimulatorServer) -> stripe.StripeClient:
    return stripe_client(server.url, timeout=SHORT_TIMEOUT)


def rzp_refund(
    client: razorpay.Client,
    payment_id: str,
    key: str,
    amount: int = 300,
    ref: str = "ref-1",
    timeout: float = 5,
) -> dict[str, Any]:
    body = {"amount": amount, "speed": "normal", "notes": {"refund_ref": ref}}
    return client.payment.refund(
        payment_id, body, headers={"X-Refund-Idempotency": key}, timeout=timeout
    )


def stripe_refund(
    client: stripe.StripeClient, intent_id: str, key: str, amount: int = 300, ref: str = "ref-1"
) -> stripe.Refund:
    params: dict[str, Any] = {
        "payment_intent": intent_id,
        "amount": amount,
        "metadata": {"refund_ref": ref},
    }
    return client.v1.refunds.create(params=params, options={"idempotency_key": key})


# -- Razorpay -----------------------------------------------------------------------------------


def test_razorpay_refund_and_idempotent_replay(state: SimulatorState, rzp: razorpay.Client):
    payment = state.add_payment("razorpay", amount=1000)

    first = rzp_refund(rzp, payment["id"], "key-000000001")
    again = rzp_refund(rzp, payment["id"], "key-000000001")

    assert first["id"].startswith("rfnd_") and first["status"] == "processed"
    assert again["id"] == first["id"]
    assert first["notes"] == {"refund_ref": "ref-1"} and first["amount"] == 300
    fetched = rzp.payment.fetch(payment["id"], timeout=5)
    assert (fetched["amount_refunded"], fetched["refund_status"]) == (300, "partial")
    assert rzp.refund.fetch(first["id"], timeout=5)["id"] == first["id"]
    listed = rzp.payment.fetch_multiple_refund(payment["id"], {"count": 10}, timeout=5)
    assert [r["id"] for r in listed["items"]] == [first["id"]]
    assert state.effects() == {
        "refunds_created": 1,
        "by_idempotency_key": {"key-000000001": 1},
        "by_reference": {"ref-1": 1},
        "duplicates": [],
    }


def test_razorpay_key_reused_with_another_body_is_refused(
    state: SimulatorState, rzp: razorpay.Client
):
    payment = state.add_payment("razorpay", amount=1000)
    rzp_refund(rzp, payment["id"], "key-000000001", amount=300)

    with pytest.raises(razorpay.errors.BadRequestError, match="different request"):
        rzp_refund(rzp, payment["id"], "key-000000001", amount=400)
    assert state.effects()["refunds_created"] == 1


@pytest.mark.parametrize(
    ("headers", "match"),
    [({}, "X-Refund-Idempotency"), ({"X-Refund-Idempotency": "short"}, "X-Refund-Idempotency")],
)
def test_razorpay_refund_needs_a_well_formed_key(
    state: SimulatorState, rzp: razorpay.Client, headers: dict[str, str], match: str
):
    payment = state.add_payment("razorpay", amount=1000)
    with pytest.raises(razorpay.errors.BadRequestError, match=match):
        rzp.payment.refund(payment["id"], {"amount": 100}, headers=headers, timeout=5)
    assert state.effects()["refunds_created"] == 0


def test_razorpay_refund_validation(state: SimulatorState, rzp: razorpay.Client):
    captured = state.add_payment("razorpay", amount=1000)
    authorized = state.add_payment("razorpay", amount=1000, status="authorized")

    with pytest.raises(razorpay.errors.BadRequestError, match="does not exist"):
        rzp_refund(rzp, "pay_missing", "key-000000001")
    with pytest.raises(razorpay.errors.BadRequestError, match="not been captured"):
        rzp_refund(rzp, authorized["id"], "key-000000002")
    with pytest.raises(razorpay.errors.BadRequestError, match="The amount must"):
        rzp_refund(rzp, captured["id"], "key-000000003", amount=1001)
    with pytest.raises(razorpay.errors.BadRequestError, match="The amount must"):
        rzp_refund(rzp, captured["id"], "key-000000004", amount=0)
    with pytest.raises(razorpay.errors.BadRequestError, match="does not exist"):
        rzp.refund.fetch("rfnd_missing", timeout=5)
    assert state.effects()["refunds_created"] == 0

    rzp_refund(rzp, captured["id"], "key-000000005", amount=1000)
    assert rzp.payment.fetch(captured["id"], timeout=5)["status"] == "refunded"
    with pytest.raises(razorpay.errors.BadRequestError, match="fully refunded"):
        rzp_refund(rzp, captured["id"], "key-000000006", amount=1)


def test_razorpay_pending_refund_settles(state: SimulatorState, rzp: razorpay.Client):
    payment = state.add_payment("razorpay", amount=1000)
    state.set_refund_outcome("razorpay", "pending")

    refund = rzp_refund(rzp, payment["id"], "key-000000001")
    assert refund["status"] == "pending"
    state.settle_refund(refund["id"], "processed")
    fetched = rzp.payment.fetch_refund_id(payment["id"], refund["id"], timeout=5)
    assert fetched["status"] == "processed"


def test_razorpay_auth_failure(server: SimulatorServer, state: SimulatorState):
    client = razorpay.Client(auth=(KEY_ID, "wrong"), base_url=server.url)
    with pytest.raises(razorpay.errors.BadRequestError, match="Authentication failed"):
        client.payment.all({}, timeout=5)


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("500", razorpay.errors.ServerError),
        ("503", razorpay.errors.ServerError),
        ("502", razorpay.errors.GatewayError),
        ("429", razorpay.errors.BadRequestError),
    ],
)
def test_razorpay_status_faults(
    state: SimulatorState, rzp: razorpay.Client, kind: str, error: type[Exception]
):
    payment = state.add_payment("razorpay", amount=1000)
    state.add_fault("razorpay.refund.create", kind, remaining=1)

    with pytest.raises(error):
        rzp_refund(rzp, payment["id"], "key-000000001")
    assert state.effects()["refunds_created"] == 0
    assert state.stats()["faults_injected"] == {kind: 1}

    # The fault is used up, and it left no key behind: the retry makes the refund.
    assert rzp_refund(rzp, payment["id"], "key-000000001")["status"] == "processed"
    assert state.effects()["refunds_created"] == 1


def test_razorpay_timeout_fault(state: SimulatorState, rzp: razorpay.Client):
    payment = state.add_payment("razorpay", amount=1000)
    state.add_fault("razorpay.*", "timeout", hang_seconds=1.5)

    with pytest.raises(requests.exceptions.Timeout):
        rzp_refund(rzp, payment["id"], "key-000000001", timeout=SHORT_TIMEOUT)
    with pytest.raises(requests.exceptions.Timeout):
        rzp.payment.fetch(payment["id"], timeout=SHORT_TIMEOUT)
    assert state.effects()["refunds_created"] == 0


def test_razorpay_lost_response_still_refunds_once(state: SimulatorState, rzp: razorpay.Client):
    payment = state.add_payment("razorpay", amount=1000)
    state.add_fault("razorpay.refund.create", "lost", hang_seconds=1.5, remaining=1)

    with pytest.raises(requests.exceptions.Timeout):
        rzp_refund(rzp, payment["id"], "key-000000001", timeout=SHORT_TIMEOUT)
    assert state.effects()["refunds_created"] == 1

    replay = rzp_refund(rzp, payment["id"], "key-000000001")
    assert state.effects()["by_idempotency_key"] == {"key-000000001": 1}
    assert (
        rzp.payment.fetch_multiple_refund(payment["id"], timeout=5)["items"][0]["id"]
        == (replay["id"])
    )


def test_razorpay_payment_list_pages(state: SimulatorState, rzp: razorpay.Client):
    base = 1_700_000_000
    ids = state.add_payments(
        "razorpay", [{"amount": 100 + i, "created": base + i} for i in range(250)]
    )

    seen: list[str] = []
    for skip in (0, 100, 200, 300):
        page = rzp.payment.all({"count": 100, "skip": skip}, timeout=5)
        assert page["entity"] == "collection" and page["count"] == len(page["items"])
        seen += [item["id"] for item in page["items"]]
    assert seen == ids[::-1]  # newest first

    window = rzp.payment.all({"from": base + 10, "to": base + 19, "count": 100}, timeout=5)
    assert [item["created_at"] for item in window["items"]] == list(range(base + 19, base + 9, -1))
    with pytest.raises(razorpay.errors.BadRequestError, match="count"):
        rzp.payment.all({"count": 101}, timeout=5)


# -- Stripe -------------------------------------------------------------------------------------


def test_stripe_refund_and_idempotent_replay(state: SimulatorState, stp: stripe.StripeClient):
    intent = state.add_payment("stripe", amount=1000)

    first = stripe_refund(stp, intent["id"], "key-1")
    again = stripe_refund(stp, intent["id"], "key-1")

    assert first.id.startswith("re_") and first.status == "succeeded"
    assert first.metadata["refund_ref"] == "ref-1" and first.currency == "usd"
    assert again.id == first.id
    assert again.last_response.headers.get("Idempotent-Replayed") == "true"
    assert stp.v1.refunds.retrieve(first.id).amount == 300
    listed = stp.v1.refunds.list(params={"payment_intent": intent["id"]})
    assert [r.id for r in listed.data] == [first.id] and not listed.has_more
    assert state.effects()["refunds_created"] == 1
    assert state.effects()["by_idempotency_key"] == {"key-1": 1}


def test_stripe_key_reused_with_other_params_is_refused(
    state: SimulatorState, stp: stripe.StripeClient
):
    intent = state.add_payment("stripe", amount=1000)
    stripe_refund(stp, intent["id"], "key-1", amount=300)

    with pytest.raises(stripe.IdempotencyError):
        stripe_refund(stp, intent["id"], "key-1", amount=400)
    assert state.effects()["refunds_created"] == 1


def test_stripe_key_expires_after_a_day(state: SimulatorState, stp: stripe.StripeClient):
    intent = state.add_payment("stripe", amount=1000)
    first = stripe_refund(stp, intent["id"], "key-1")

    state.advance(DAY - 60)
    assert stripe_refund(stp, intent["id"], "key-1").id == first.id
    state.advance(61)
    second = stripe_refund(stp, intent["id"], "key-1")

    # The danger the product guards against: an expired key refunds a second time.
    assert second.id != first.id
    effects = state.effects()
    assert effects["by_idempotency_key"] == {"key-1": 2}
    assert effects["duplicates"] == ["ref-1"]


def test_stripe_api_version_other_than_the_adapters_is_refused(
    state: SimulatorState, server: SimulatorServer
):
    intent = state.add_payment("stripe", amount=1000)
    older = stripe.StripeClient(
        API_KEY,
        base_addresses={"api": server.url},
        http_client=stripe.RequestsClient(timeout=5),
        max_network_retries=0,
        stripe_version="2024-06-20",
    )

    with pytest.raises(stripe.InvalidRequestError, match="Invalid Stripe API version: 2024-06-20"):
        older.v1.payment_intents.retrieve(intent["id"])
    assert state.stats()["stripe_versions"] == {"2024-06-20": 1}


def test_stripe_refund_validation(state: SimulatorState, stp: stripe.StripeClient):
    intent = state.add_payment("stripe", amount=1000)
    uncaptured = state.add_payment("stripe", amount=1000, status="requires_capture")

    with pytest.raises(stripe.InvalidRequestError) as missing:
        stripe_refund(stp, "pi_missing", "key-1")
    assert missing.value.param == "payment_intent"
    with pytest.raises(stripe.InvalidRequestError) as too_much:
        stripe_refund(stp, intent["id"], "key-2", amount=1001)
    assert (too_much.value.param, too_much.value.code) == ("amount", "amount_too_large")
    with pytest.raises(stripe.InvalidRequestError):
        stripe_refund(stp, uncaptured["id"], "key-3")
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        stp.v1.refunds.retrieve("re_missing")
    assert unknown.value.http_status == 404
    assert state.effects()["refunds_created"] == 0


def test_stripe_pending_refund_fails_and_frees_the_amount(
    state: SimulatorState, stp: stripe.StripeClient
):
    intent = state.add_payment("stripe", amount=1000)
    state.set_refund_outcome("stripe", "pending")

    refund = stripe_refund(stp, intent["id"], "key-1", amount=1000)
    assert refund.status == "pending"
    state.settle_refund(refund.id, "failed")
    assert stp.v1.refunds.retrieve(refund.id).status == "failed"
    state.set_refund_outcome("stripe", "succeeded")
    assert stripe_refund(stp, intent["id"], "key-2", amount=1000).status == "succeeded"


def test_stripe_auth_failure(server: SimulatorServer, state: SimulatorState):
    with pytest.raises(stripe.AuthenticationError):
        stripe_client(server.url, api_key="sk_test_wrong").v1.payment_intents.list()


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("500", stripe.APIError),
        ("502", stripe.APIError),
        ("503", stripe.APIError),
        ("429", stripe.RateLimitError),
    ],
)
def test_stripe_status_faults(
    state: SimulatorState, stp: stripe.StripeClient, kind: str, error: type[Exception]
):
    intent = state.add_payment("stripe", amount=1000)
    state.add_fault("stripe.refund.create", kind, remaining=1)

    with pytest.raises(error) as raised:
        stripe_refund(stp, intent["id"], "key-1")
    assert raised.value.http_status == int(kind)
    assert state.effects()["refunds_created"] == 0

    assert stripe_refund(stp, intent["id"], "key-1").status == "succeeded"
    assert state.effects()["refunds_created"] == 1


def test_stripe_timeout_fault(state: SimulatorState, stp_short: stripe.StripeClient):
    intent = state.add_payment("stripe", amount=1000)
    state.add_fault("stripe.refund.create", "timeout", hang_seconds=1.5)

    with pytest.raises(stripe.APIConnectionError):
        stripe_refund(stp_short, intent["id"], "key-1")
    assert state.effects()["refunds_created"] == 0


def test_stripe_lost_response_still_refunds_once(
    state: SimulatorState, stp: stripe.StripeClient, stp_short: stripe.StripeClient
):
    intent = state.add_payment("stripe", amount=1000)
    state.add_fault("stripe.refund.create", "lost", hang_seconds=1.5, remaining=1)

    with pytest.raises(stripe.APIConnectionError):
        stripe_refund(stp_short, intent["id"], "key-1")
    assert state.effects()["refunds_created"] == 1

    replay = stripe_refund(stp, intent["id"], "key-1")
    assert replay.last_response.headers.get("Idempotent-Replayed") == "true"
    assert state.effects()["refunds_created"] == 1


def test_stripe_payment_intent_list_pages(state: SimulatorState, stp: stripe.StripeClient):
    base = 1_700_000_000
    ids = state.add_payments("stripe", [{"amount": 100, "created": base + i} for i in range(250)])

    seen: list[str] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = stp.v1.payment_intents.list(params=dict(params))
        seen += [intent.id for intent in page.data]
        if not page.has_more:
            break
        params["starting_after"] = page.data[-1].id
    assert seen == ids[::-1]

    window = stp.v1.payment_intents.list(
        params={"created": {"gte": base + 10, "lt": base + 20}, "limit": 3}
    )
    assert [i.created for i in window.auto_paging_iter()] == list(range(base + 19, base + 9, -1))
    assert stp.v1.payment_intents.retrieve(ids[0]).amount_received == 100


# -- Fault rules, control API, serving ----------------------------------------------------------


def test_fault_rate_is_reproducible_with_a_seed(state: SimulatorState, rzp: razorpay.Client):
    payment = state.add_payment("razorpay", amount=1000)

    def outcomes() -> list[bool]:
        results = []
        for _ in range(20):
            try:
                rzp.payment.fetch(payment["id"], timeout=5)
                results.append(True)
            except razorpay.errors.ServerError:
                results.append(False)
        return results

    state.seed(7)
    state.add_fault("razorpay.payment.fetch", "500", rate=0.5)
    first = outcomes()
    state.seed(7)
    assert outcomes() == first
    assert 0 < first.count(False) < 20
    assert state.stats()["requests"]["razorpay.payment.fetch"] == 40


def test_wildcard_latency_and_untouched_gateways(
    state: SimulatorState, rzp: razorpay.Client, stp: stripe.StripeClient
):
    payment = state.add_payment("razorpay", amount=1000)
    intent = state.add_payment("stripe", amount=1000)
    state.add_fault("*", "latency", latency_ms=150)
    state.add_fault("razorpay.*", "503")

    started = time.monotonic()
    assert stp.v1.payment_intents.retrieve(intent["id"]).status == "succeeded"
    assert time.monotonic() - started >= 0.15
    with pytest.raises(razorpay.errors.ServerError):
        rzp.payment.fetch(payment["id"], timeout=5)
    assert state.stats()["faults_injected"] == {"latency": 2, "503": 1}


def test_bad_fault_rules_are_refused(state: SimulatorState):
    with pytest.raises(ValueError, match="matches none"):
        state.add_fault("razorpay.refunds.create", "500")
    with pytest.raises(ValueError, match="kind"):
        state.add_fault("*", "418")
    with pytest.raises(ValueError, match="rate"):
        state.add_fault("*", "500", rate=1.5)


def test_control_api(server: SimulatorServer, state: SimulatorState, rzp: razorpay.Client):
    sim = f"{server.url}/_sim"
    payment = requests.post(
        f"{sim}/payments", json={"gateway": "razorpay", "amount": 500, "currency": "inr"}, timeout=5
    ).json()
    assert (payment["currency"], payment["status"]) == ("INR", "captured")
    rule = requests.post(
        f"{sim}/faults", json={"endpoint": "razorpay.refund.create", "kind": "502"}, timeout=5
    )
    assert rule.json()["kind"] == "502"
    assert (
        requests.post(f"{sim}/faults", json={"endpoint": "x", "kind": "500"}, timeout=5).status_code
        == 400
    )
    with pytest.raises(razorpay.errors.GatewayError):
        rzp_refund(rzp, payment["id"], "key-000000001")
    assert requests.delete(f"{sim}/faults", timeout=5).json() == {"ok": True}

    requests.post(
        f"{sim}/refund_outcome", json={"gateway": "razorpay", "status": "pending"}, timeout=5
    )
    refund = rzp_refund(rzp, payment["id"], "key-000000001")
    settled = requests.post(
        f"{sim}/refunds/{refund['id']}/settle", json={"status": "processed"}, timeout=5
    )
    assert settled.json()["status"] == "processed"
    assert requests.get(f"{sim}/effects", timeout=5).json()["refunds_created"] == 1
    stats = requests.get(f"{sim}/stats", timeout=5).json()
    assert stats["requests"]["razorpay.refund.create"] == 2
    assert stats["faults_injected"] == {"502": 1}
    now = requests.post(f"{sim}/clock/advance", json={"seconds": DAY}, timeout=5).json()["now"]
    assert now >= time.time() + DAY - 5
    assert requests.post(f"{sim}/seed", json={"seed": 3}, timeout=5).json() == {"ok": True}
    assert requests.post(f"{sim}/reset", timeout=5).json() == {"ok": True}
    assert state.effects()["refunds_created"] == 0


def test_unknown_paths_answer_in_the_gateways_error_shape(
    state: SimulatorState, rzp: razorpay.Client, stp: stripe.StripeClient
):
    with pytest.raises(razorpay.errors.BadRequestError):
        rzp.request("get", "/v1/orders", timeout=5)
    with pytest.raises(stripe.InvalidRequestError):
        stp.v1.customers.list()


def test_bulk_payments_are_fast(state: SimulatorState, rzp: razorpay.Client):
    started = time.monotonic()
    ids = state.add_payments("razorpay", ({"amount": 100, "created": i} for i in range(50_000)))
    assert len(ids) == 50_000 and time.monotonic() - started < 5
    assert rzp.payment.all({"count": 1}, timeout=5)["items"][0]["id"] == ids[-1]
    with pytest.raises(ValueError, match="already exists"):
        state.add_payments("razorpay", [{"amount": 1, "id": "pay_x"}, {"amount": 1, "id": "pay_x"}])
