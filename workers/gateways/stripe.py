"""The Stripe adapter, on the official `stripe` SDK's `StripeClient`.

The SDK's own network retries are off: retries are the task's, with backoff and jitter, and
always with the attempt's persisted idempotency key. Payment listings, read a hundred at a
time by reconciliation, go through the SDK's `raw_request` (the same authentication, request
and error handling): turning every page into typed `StripeObject`s cost two thirds of the CPU
of reading it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import stripe

from workers.gateways.base import (
    GatewayNotFound,
    GatewayPayment,
    GatewayPermanent,
    GatewayRefund,
    GatewayTransient,
    OutcomeUnknown,
    PaymentPage,
    RefundRequest,
    payment_status,
    refund_status,
)
from workers.gateways.http import http_session

T = TypeVar("T")
API = "https://api.stripe.com"
PAGE = 100  # Stripe's largest `limit`


class StripeGateway:
    name = "stripe"
    key_ttl: timedelta | None = timedelta(hours=24)  # Stripe prunes keys after 24 hours

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
        )
        self._v1 = self._client.v1

    def _call(self, what: str, call: Callable[[], T], *, effectful: bool = False) -> T:
        try:
            return call()
        except stripe.APIConnectionError as exc:
            message = f"stripe {what}: {exc.user_message or exc}"
            # The SDK cannot tell a refused connection from one lost after sending.
            raise (OutcomeUnknown(message) if effectful else GatewayTransient(message)) from exc
        except stripe.StripeError as exc:
            raise _sort(what, exc) from exc

    def submit_refund(self, request: RefundRequest) -> GatewayRefund:
        params: dict[str, Any] = {
            "payment_intent": request.gateway_payment_id,
            "amount": request.amount,
            "metadata": request.reference(),
        }
        refund = self._call(
            "refund.create",
            lambda: self._v1.refunds.create(
                params=params, options={"idempotency_key": request.idempotency_key}
            ),
            effectful=True,
        )
        return _refund(refund)

    def fetch_refund(self, gateway_payment_id: str, refund_id: str) -> GatewayRefund:
        return _refund(self._call("refund.fetch", lambda: self._v1.refunds.retrieve(refund_id)))

    def find_refund(self, request: RefundRequest) -> GatewayRefund | None:
        params: dict[str, Any] = {"payment_intent": request.gateway_payment_id, "limit": PAGE}
        while True:
            page = self._call(
                "refund.list", lambda params=params: self._v1.refunds.list(params=dict(params))
            )
            for refund in page.data:
                found = _refund(refund)
                if found.idempotency_key == request.idempotency_key:
                    return found
            if not page.has_more or not page.data:
                return None
            params["starting_after"] = page.data[-1].id

    def fetch_payment(self, payment_id: str) -> GatewayPayment:
        return _payment(
            self._call(
                "payment_intent.fetch", lambda: self._v1.payment_intents.retrieve(payment_id)
            )
        )

    def list_payments(self, start: datetime, end: datetime) -> Iterator[list[GatewayPayment]]:
        cursor = None
        while True:
            page = self.payment_page(start, end, cursor)
            yield page.items
            if page.cursor is None:
                return
            cursor = page.cursor

    def payment_page(self, start: datetime, end: datetime, cursor: str | None) -> PaymentPage:
        params: dict[str, Any] = {
            "created": {"gte": int(start.timestamp()), "lt": int(end.timestamp())},
            "limit": PAGE,
        }
        if cursor is not None:
            params["starting_after"] = cursor
        response = self._call(
            "payment_intent.list",
            lambda: self._client.raw_request("get", "/v1/payment_intents", **params),
        )
        body = response.data
        entities = body["data"]
        more = bool(body.get("has_more")) and bool(entities)
        return PaymentPage(entities, entities[-1]["id"] if more else None, _payment_dict)


def _sort(what: str, exc: stripe.StripeError) -> Exception:
    status = exc.http_status
    message = f"stripe {what}: HTTP {status}: {exc.user_message or exc}"
    if status == 404 and getattr(exc, "code", None) == "resource_missing":
        return GatewayNotFound(message)
    if isinstance(exc, stripe.RateLimitError | stripe.APIError) or (
        status is not None
        and (status in (409, 429) or status >= 500)
        and not isinstance(exc, stripe.IdempotencyError)
    ):
        return GatewayTransient(message)
    return GatewayPermanent(message)


def _refund(obj: Any) -> GatewayRefund:
    refund = obj.to_dict()  # a StripeObject is no dict in SDK 16; its plain form is
    metadata = refund.get("metadata") or {}
    return GatewayRefund(
        id=refund["id"],
        status=refund_status("stripe", refund["status"]),
        raw_status=refund["status"],
        amount=int(refund["amount"]),
        currency=str(refund["currency"]).upper(),
        idempotency_key=metadata.get("backstop_idempotency_key"),
    )


def _payment(obj: Any) -> GatewayPayment:
    return _payment_dict(obj.to_dict())


def _payment_dict(intent: dict[str, Any]) -> GatewayPayment:
    return GatewayPayment(
        id=intent["id"],
        status=payment_status("stripe", intent["status"]),
        raw_status=intent["status"],
        amount=int(intent["amount"]),
        currency=str(intent["currency"]).upper(),
        created_at=datetime.fromtimestamp(int(intent["created"]), UTC),
        order_id=(intent.get("metadata") or {}).get("order_id"),
    )
