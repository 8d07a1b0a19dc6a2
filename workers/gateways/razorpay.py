"""The Razorpay adapter, on the official `razorpay` SDK.

The SDK sets no timeout and hides the HTTP status behind three exception classes, so the
adapter gives it a `requests` session whose response hook keeps the last status, and passes an
explicit timeout on every call.
"""

from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
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
    payment_status,
    refund_status,
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
    # Razorpay documents no expiry for X-Refund-Idempotency; assuming the same 24 h as Stripe
    # only means an unknown outcome is looked up before it is sent again, which is always safe.
    key_ttl: timedelta | None = timedelta(hours=24)

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

    def _call(self, what: str, call: Callable[[], T], *, effectful: bool = False) -> T:
        self._status.code = None
        try:
            return call()
        except requests.ConnectTimeout as exc:  # nothing was sent
            raise GatewayTransient(f"razorpay {what}: connect timeout") from exc
        except requests.Timeout as exc:
            raise _maybe_done(effectful, f"razorpay {what}: timed out") from exc
        except requests.ConnectionError as exc:
            if _refused(exc):
                raise GatewayTransient(f"razorpay {what}: connection refused") from exc
            raise _maybe_done(effectful, f"razorpay {what}: connection lost") from exc
        except (
            razorpay.errors.BadRequestError,
            razorpay.errors.GatewayError,
            razorpay.errors.ServerError,
            requests.JSONDecodeError,
        ) as exc:
            raise self._sort(what, exc) from exc

    def _sort(self, what: str, exc: Exception) -> Exception:
        status = getattr(self._status, "code", None)
        message = f"razorpay {what}: HTTP {status}: {exc}"
        if status is not None and (status in (409, 429) or status >= 500):
            return GatewayTransient(message)
        if status == 404 or (status == 400 and "does not exist" in str(exc)):
            return GatewayNotFound(message)
        if isinstance(exc, razorpay.errors.BadRequestError) or (status and status < 500):
            return GatewayPermanent(message)
        return GatewayTransient(message)

    def submit_refund(self, request: RefundRequest) -> GatewayRefund:
        body = {
            "amount": request.amount,
            "speed": "normal",
            "notes": request.reference(),
            "receipt": f"refund-{request.refund_id}",
        }
        entity = self._call(
            "refund.create",
            lambda: self._client.payment.refund(
                request.gateway_payment_id,
                body,
                timeout=self._timeout,
                headers={"X-Refund-Idempotency": request.idempotency_key},
            ),
            effectful=True,
        )
        return _refund(entity)

    def fetch_refund(self, gateway_payment_id: str, refund_id: str) -> GatewayRefund:
        return _refund(
            self._call(
                "refund.fetch", lambda: self._client.refund.fetch(refund_id, timeout=self._timeout)
            )
        )

    def find_refund(self, request: RefundRequest) -> GatewayRefund | None:
        skip = 0
        while True:
            page = self._call(
                "payment.refunds",
                lambda skip=skip: self._client.payment.fetch_multiple_refund(
                    request.gateway_payment_id, {"count": PAGE, "skip": skip}, timeout=self._timeout
                ),
            )
            for entity in page.get("items", []):
                found = _refund(entity)
                if found.idempotency_key == request.idempotency_key:
                    return found
            if len(page.get("items", [])) < PAGE:
                return None
            skip += PAGE

    def fetch_payment(self, payment_id: str) -> GatewayPayment:
        return _payment(
            self._call(
                "payment.fetch",
                lambda: self._client.payment.fetch(payment_id, timeout=self._timeout),
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
        page = self._call(
            "payment.list", lambda: self._client.payment.all(query, timeout=self._timeout)
        )
        entities = page.get("items", [])
        return PaymentPage(entities, str(skip + PAGE) if len(entities) == PAGE else None, _payment)


def _maybe_done(effectful: bool, message: str) -> Exception:
    return OutcomeUnknown(message) if effectful else GatewayTransient(message)


def _refused(exc: requests.ConnectionError) -> bool:
    # urllib3 raises NewConnectionError when the TCP connection was never made.
    return "NewConnectionError" in repr(exc) or "Connection refused" in str(exc)


def _refund(entity: dict[str, Any]) -> GatewayRefund:
    notes = entity.get("notes") or {}
    return GatewayRefund(
        id=entity["id"],
        status=refund_status("razorpay", entity["status"]),
        raw_status=entity["status"],
        amount=int(entity["amount"]),
        currency=entity["currency"].upper(),
        idempotency_key=notes.get("backstop_idempotency_key") if isinstance(notes, dict) else None,
    )


def _payment(entity: dict[str, Any]) -> GatewayPayment:
    return GatewayPayment(
        id=entity["id"],
        status=payment_status("razorpay", entity["status"]),
        raw_status=entity["status"],
        amount=int(entity["amount"]),
        currency=entity["currency"].upper(),
        created_at=datetime.fromtimestamp(int(entity["created_at"]), UTC),
        order_id=entity.get("order_id"),
    )
