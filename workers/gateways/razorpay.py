"""The Razorpay adapter, on the official `razorpay` SDK.

The SDK sets no timeout and hides the HTTP status behind three exception classes, so the
adapter gives it a `requests` session whose response hook keeps the last status, and passes an
explicit timeout on every call.
"""

from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import razorpay
import razorpay.errors
import requests

from workers.gateways.base import (
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
API = "https://api.razorpay.com"
PAGE = 100  # Razorpay's largest `count`
SDK_VERSION = importlib.metadata.version("razorpay")


class _Client(razorpay.Client):  # type: ignore[misc]
    """The SDK's client, less one cost: it reads its own version from the package metadata
    for the User-Agent of every request (~1 ms, a third of the client's CPU for a page of
    100 payments). The version cannot change while the process runs."""

    def _get_version(self) -> str:
        return SDK_VERSION


class RazorpayGateway:
    name = "razorpay"

    def __init__(
        self,
        key_id: str,
        key_secret: str,
        base_url: str | None,
        timeout: float,
        connections: int = 10,
    ):
        self._status = threading.local()
        session = http_session(base_url or API, connections)
        session.hooks["response"].append(self._remember_status)
        options = {"base_url": base_url.rstrip("/")} if base_url else {}
        self._client = _Client(session=session, auth=(key_id, key_secret), **options)
        self._timeout = timeout

    def _remember_status(self, response: requests.Response, *_: Any, **__: Any) -> None:
        self._status.code = response.status_code

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
        where = f"razorpay {what}"
        self._status.code = None
        try:
            answer = call()
        except requests.ConnectTimeout as exc:  # nothing was sent
            raise GatewayTransient(f"{where}: connect timeout") from exc
        except requests.Timeout as exc:
            raise maybe_done(effectful, f"{where}: timed out") from exc
        except requests.ConnectionError as exc:
            if _refused(exc):
                raise GatewayTransient(f"{where}: connection refused") from exc
            raise maybe_done(effectful, f"{where}: connection lost") from exc
        except (
            razorpay.errors.BadRequestError,
            razorpay.errors.GatewayError,
            razorpay.errors.ServerError,
            requests.JSONDecodeError,
        ) as exc:
            raise self._sort(where, exc, effectful) from exc
        except Exception as exc:  # the SDK failed in a way it does not document
            raise unexpected(where, exc, effectful) from exc
        return read_answer(answer, read, where, effectful)

    def _sort(self, where: str, exc: Exception, effectful: bool) -> Exception:
        status = getattr(self._status, "code", None)
        message = f"{where}: HTTP {status}: {exc}"
        if status in (409, 429, 503):  # not processed: send again later
            return GatewayTransient(message)
        if (
            status is None
            or status < 400
            or status >= 500
            or isinstance(exc, requests.JSONDecodeError)
        ):
            # A server error, or a success (2xx) whose body is not JSON (a truncated answer, a
            # proxy's page): the request may have been processed.
            return maybe_done(effectful, message)
        if effectful and _key_used_before(exc):
            # The key was used before with another body: that request may have refunded.
            return OutcomeUnknown(message)
        if status == 404 or (status == 400 and "does not exist" in str(exc)):
            return GatewayNotFound(message)
        if isinstance(exc, razorpay.errors.BadRequestError) or (status and status < 500):
            return GatewayPermanent(message)
        return maybe_done(effectful, message)

    def submit_refund(self, request: RefundRequest) -> GatewayRefund:
        body = {
            "amount": request.amount,
            "speed": "normal",
            "notes": request.reference(),
            "receipt": f"refund-{request.refund_id}",
        }
        return self._call(
            "refund.create",
            lambda: self._client.payment.refund(
                request.gateway_payment_id,
                body,
                timeout=self._timeout,
                headers={"X-Refund-Idempotency": request.idempotency_key},
            ),
            _refund,
            effectful=True,
        )

    def fetch_refund(self, gateway_payment_id: str, refund_id: str) -> GatewayRefund:
        return self._call(
            "refund.fetch",
            lambda: self._client.refund.fetch(refund_id, timeout=self._timeout),
            _refund,
        )

    def find_refund(self, request: RefundRequest) -> GatewayRefund | None:
        skip = 0
        while True:
            entities = self._call(
                "payment.refunds",
                lambda skip=skip: self._client.payment.fetch_multiple_refund(
                    request.gateway_payment_id, {"count": PAGE, "skip": skip}, timeout=self._timeout
                ),
                lambda page, where: items_of(page, "items", where),
            )
            where = "razorpay payment.refunds"
            for entity in entities:
                if reference_key(entity, "notes", where) == request.idempotency_key:
                    return _refund(entity, where, listed=True)
            if len(entities) < PAGE:
                return None
            skip += PAGE

    def fetch_payment(self, payment_id: str) -> GatewayPayment:
        return self._call(
            "payment.fetch",
            lambda: self._client.payment.fetch(payment_id, timeout=self._timeout),
            _payment,
        )

    def payment_page(self, start: datetime, end: datetime, cursor: str | None) -> PaymentPage:
        # Razorpay's window is inclusive at both ends, in whole seconds; its pages are offsets
        # into it, newest first, so a payment created in the window meanwhile shifts the rest
        # by one: the caller de-duplicates.
        skip = int(cursor or 0)
        query = {
            "from": int(start.timestamp()),
            "to": int(end.timestamp()) - 1,
            "count": PAGE,
            "skip": skip,
        }
        entities = self._call(
            "payment.list",
            lambda: self._client.payment.all(query, timeout=self._timeout),
            lambda page, where: items_of(page, "items", where),
        )
        return PaymentPage(
            entities, str(skip + PAGE) if len(entities) == PAGE else None, _listed_payment
        )


def _refused(exc: requests.ConnectionError) -> bool:
    # urllib3 raises NewConnectionError when the TCP connection was never made.
    return "NewConnectionError" in repr(exc) or "Connection refused" in str(exc)


def _key_used_before(exc: Exception) -> bool:
    """Razorpay's refusal of an idempotency key already used with another request."""
    text = str(exc).lower()
    return "idempotency" in text and "required" not in text


def _refund(entity: Any, where: str = "razorpay refund", *, listed: bool = False) -> GatewayRefund:
    """A refund entity. One found in a payment's refund listing may come without `status`
    (Razorpay's own examples): it exists, so it is PROCESSING until fetched by its id."""
    raw = entity.get("status") if listed and isinstance(entity, dict) else None
    if not listed or raw is not None:
        raw = need(entity, "status", str, where)
    return GatewayRefund(
        id=need(entity, "id", str, where),
        status=refund_status("razorpay", raw) if raw is not None else "PROCESSING",
        raw_status=raw if raw is not None else "(not listed)",
        amount=need(entity, "amount", int, where),
        currency=need(entity, "currency", str, where).upper(),
        idempotency_key=reference_key(entity, "notes", where),
    )


def _payment(entity: Any, where: str = "razorpay payment") -> GatewayPayment:
    order_id = entity.get("order_id") if isinstance(entity, dict) else None
    return GatewayPayment(
        id=need(entity, "id", str, where),
        status=payment_status("razorpay", raw := need(entity, "status", str, where)),
        raw_status=raw,
        amount=need(entity, "amount", int, where),
        currency=need(entity, "currency", str, where).upper(),
        created_at=timestamp(entity, "created_at", where),
        order_id=order_id if isinstance(order_id, str) else None,
    )


def _listed_payment(entity: Any) -> GatewayPayment:
    return _payment(entity, "razorpay payment.list")
