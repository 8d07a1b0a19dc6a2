"""The Stripe adapter, on the official `stripe` SDK's `StripeClient`.

The SDK's own network retries are off: retries are the task's, with backoff and jitter, and
always with the attempt's persisted idempotency key. Payment listings, read a hundred at a
time by reconciliation, go through the SDK's `raw_request` (the same authentication, request
and error handling): turning every page into typed `StripeObject`s cost two thirds of the CPU
of reading it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import stripe

from workers.gateways.base import (
    GatewayMalformed,
    GatewayNotFound,
    GatewayPayment,
    GatewayPermanent,
    GatewayRefund,
    GatewayTransient,
    OutcomeUnknown,
    PaymentPage,
    RefundRequest,
    items_of,
    maybe_done,
    need,
    payment_status,
    read_answer,
    reference_key,
    refund_status,
    timestamp,
    unexpected,
)
from workers.gateways.http import http_session

T = TypeVar("T")
API = "https://api.stripe.com"
# The Stripe API version this adapter is written and tested for: the one stripe-python 16.x
# targets (pyproject.toml allows that major only). Sent on every request, so what Stripe answers
# never changes shape with the account's default version; a new SDK major is a new version,
# adopted on purpose (tests/gateways/test_adapters.py checks the two agree).
STRIPE_API_VERSION = "2026-10-28.endive"
PAGE = 100  # Stripe's largest `limit`


class StripeGateway:
    name = "stripe"

    def __init__(
        self, api_key: str, api_base: str | None, timeout: float, connections: int = 10
    ) -> None:
        session = http_session(api_base or API, connections)
        proxies = {k: v for k, v in session.proxies.items() if k in ("http", "https")}
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base.rstrip("/")} if api_base else {},
            http_client=stripe.RequestsClient(
                timeout=timeout, session=session, proxy=proxies or None
            ),
            max_network_retries=0,
            stripe_version=STRIPE_API_VERSION,
        )
        self._v1 = self._client.v1

    def _call(
        self,
        what: str,
        call: Callable[[], Any],
        read: Callable[[Any, str], T],
        *,
        effectful: bool = False,
    ) -> T:
        """Make the SDK call and read its answer with `read(answer, where)`. Every exception
        comes out sorted: on a call that moves money (`effectful`), anything but a clear
        refusal or "not sent" is an unknown outcome."""
        where = f"stripe {what}"
        try:
            answer = call()
        except stripe.APIConnectionError as exc:
            message = f"{where}: {exc.user_message or exc}"
            # The SDK cannot tell a refused connection from one lost after sending.
            raise maybe_done(effectful, message) from exc
        except stripe.StripeError as exc:
            raise _sort(where, exc, effectful) from exc
        except Exception as exc:  # the SDK failed in a way it does not document
            raise unexpected(where, exc, effectful) from exc
        return read_answer(plain(answer), read, where, effectful)

    def submit_refund(self, request: RefundRequest) -> GatewayRefund:
        params: dict[str, Any] = {
            "payment_intent": request.gateway_payment_id,
            "amount": request.amount,
            "metadata": request.reference(),
        }
        return self._call(
            "refund.create",
            lambda: self._v1.refunds.create(
                params=params, options={"idempotency_key": request.idempotency_key}
            ),
            _refund,
            effectful=True,
        )

    def fetch_refund(self, gateway_payment_id: str, refund_id: str) -> GatewayRefund:
        return self._call("refund.fetch", lambda: self._v1.refunds.retrieve(refund_id), _refund)

    def find_refund(self, request: RefundRequest) -> GatewayRefund | None:
        params: dict[str, Any] = {"payment_intent": request.gateway_payment_id, "limit": PAGE}
        where = "stripe refund.list"
        while True:
            page = self._call(
                "refund.list",
                lambda params=params: self._v1.refunds.list(params=dict(params)),
                lambda page, where: (items_of(page, "data", where), page.get("has_more")),
            )
            entities, more = page
            for entity in entities:
                if reference_key(entity, "metadata", where) == request.idempotency_key:
                    return _refund(entity, where)
            if more is not True or not entities:
                return None
            after = need(entities[-1], "id", str, where)
            if after == params.get("starting_after"):
                raise GatewayMalformed(f"{where}: the listing does not move past {after}")
            params["starting_after"] = after

    def fetch_payment(self, payment_id: str) -> GatewayPayment:
        return self._call(
            "payment_intent.fetch",
            lambda: self._v1.payment_intents.retrieve(payment_id),
            _payment,
        )

    def payment_page(self, start: datetime, end: datetime, cursor: str | None) -> PaymentPage:
        params: dict[str, Any] = {
            "created": {"gte": int(start.timestamp()), "lt": int(end.timestamp())},
            "limit": PAGE,
        }
        if cursor is not None:
            params["starting_after"] = cursor
        entities, more = self._call(
            "payment_intent.list",
            lambda: self._client.raw_request("get", "/v1/payment_intents", **params).data,
            lambda page, where: (items_of(page, "data", where), page.get("has_more") is True),
        )
        last = entities[-1] if more and entities else None
        after = need(last, "id", str, "stripe payment_intent.list") if last else None
        if after is not None and after == cursor:
            raise GatewayMalformed(
                f"stripe payment_intent.list: the listing does not move past {after}"
            )
        return PaymentPage(entities, after, _listed_payment)


def _sort(where: str, exc: stripe.StripeError, effectful: bool) -> Exception:
    status = exc.http_status
    message = f"{where}: HTTP {status}: {exc.user_message or exc}"
    if isinstance(exc, stripe.IdempotencyError):
        # Same key, other parameters: the key was used before, and that request may have
        # refunded. Asking the gateway tells; sending again cannot.
        return OutcomeUnknown(message) if effectful else GatewayPermanent(message)
    if status == 404 and getattr(exc, "code", None) == "resource_missing":
        return GatewayNotFound(message)
    if isinstance(exc, stripe.RateLimitError) or status in (409, 429, 503):
        return GatewayTransient(message)  # not processed: send again later
    if isinstance(exc, stripe.APIError) or status is None or status >= 500 or status < 400:
        # A server error, or a 2xx body the SDK could not read: it may have been processed.
        return maybe_done(effectful, message)
    return GatewayPermanent(message)


def plain(answer: Any) -> Any:
    """The JSON the gateway sent: a StripeObject is no dict in SDK 16; its plain form is."""
    to_dict = getattr(answer, "to_dict", None)
    return to_dict() if callable(to_dict) else answer


def _refund(refund: Any, where: str = "stripe refund") -> GatewayRefund:
    return GatewayRefund(
        id=need(refund, "id", str, where),
        status=refund_status("stripe", raw := need(refund, "status", str, where)),
        raw_status=raw,
        amount=need(refund, "amount", int, where),
        currency=need(refund, "currency", str, where).upper(),
        idempotency_key=reference_key(refund, "metadata", where),
    )


def _payment(intent: Any, where: str = "stripe payment_intent") -> GatewayPayment:
    metadata = intent.get("metadata") if isinstance(intent, dict) else None
    order_id = metadata.get("order_id") if isinstance(metadata, dict) else None
    return GatewayPayment(
        id=need(intent, "id", str, where),
        status=payment_status("stripe", raw := need(intent, "status", str, where)),
        raw_status=raw,
        amount=need(intent, "amount", int, where),
        currency=need(intent, "currency", str, where).upper(),
        created_at=timestamp(intent, "created", where),
        order_id=order_id if isinstance(order_id, str) else None,
    )


def _listed_payment(intent: Any) -> GatewayPayment:
    return _payment(intent, "stripe payment_intent.list")
