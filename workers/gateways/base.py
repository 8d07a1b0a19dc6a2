"""The one small interface both gateway adapters implement, and how their outcomes sort.

Every adapter call either returns what the gateway said or raises one of three errors:
`GatewayTransient` (nothing happened; try again later with the same key), `GatewayPermanent`
(the gateway refused; retrying the same request cannot help), or `OutcomeUnknown` (the
request may have taken effect: ask the gateway before doing anything else).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any, Protocol

from workers.errors import PermanentError, TransientError


class GatewayTransient(TransientError):
    """The gateway did not act (connection refused, 429, 5xx): retry with the same key."""


class CircuitOpen(GatewayTransient):
    """The gateway's circuit breaker is open: nothing was sent."""


class GatewayPermanent(PermanentError):
    """The gateway refused the request (bad request, auth, idempotency mismatch)."""


class GatewayNotFound(GatewayPermanent):
    """The gateway has no object with the id asked for."""


class OutcomeUnknown(TransientError):
    """The request may have reached the gateway and taken effect (timeout, connection lost
    after sending): resolve by asking the gateway, never by sending a new request blindly."""


# Contract section 3: gateway statuses to ours. Anything unlisted is still in progress. A
# Razorpay payment refunded in full reads `refunded`: it was captured, and its refunds are the
# refunds table's business.
RAZORPAY_PAYMENT = {
    "captured": "COMPLETED",
    "refunded": "COMPLETED",
    "authorized": "AUTHORIZED",
    "failed": "FAILED",
}
RAZORPAY_REFUND = {"processed": "COMPLETED", "failed": "FAILED", "pending": "PROCESSING"}
STRIPE_PAYMENT = {"succeeded": "COMPLETED", "requires_capture": "AUTHORIZED", "canceled": "FAILED"}
STRIPE_REFUND = {
    "succeeded": "COMPLETED",
    "failed": "FAILED",
    "canceled": "FAILED",
    "pending": "PROCESSING",
    "requires_action": "PROCESSING",
}


PAYMENT_STATUSES = {"razorpay": RAZORPAY_PAYMENT, "stripe": STRIPE_PAYMENT}


def payment_status(gateway: str, raw: str) -> str:
    return PAYMENT_STATUSES[gateway].get(raw, "PENDING")


def refund_status(gateway: str, raw: str) -> str:
    table = RAZORPAY_REFUND if gateway == "razorpay" else STRIPE_REFUND
    return table.get(raw, "PROCESSING")


@dataclass(frozen=True)
class RefundRequest:
    """One refund attempt. The same attempt is always sent with the same key and body."""

    refund_id: int
    idempotency_key: str
    gateway_payment_id: str
    amount: int
    currency: str
    reason: str | None

    def reference(self) -> dict[str, str]:
        """What we write into the refund's notes/metadata, to find it again by lookup."""
        return {
            "backstop_refund_id": str(self.refund_id),
            "backstop_idempotency_key": self.idempotency_key,
        }


@dataclass(frozen=True)
class GatewayRefund:
    id: str
    status: str  # ours: PROCESSING, COMPLETED or FAILED
    raw_status: str
    amount: int
    currency: str
    idempotency_key: str | None  # from our reference, when the refund carries one


@dataclass(frozen=True)
class GatewayPayment:
    id: str
    status: str  # ours: PENDING, AUTHORIZED, COMPLETED or FAILED
    raw_status: str
    amount: int
    currency: str
    created_at: datetime
    order_id: str | None


@dataclass(frozen=True)
class PaymentPage:
    """One page of a payment listing as the gateway sent it, and where the next page starts
    (None: this was the last). The cursor is the gateway's own: Razorpay's `skip`, Stripe's
    `starting_after`.

    Reconciliation reads a hundred payments a page, a million a night, and compares nearly all
    of them in the database: `columns()` takes what that needs straight from the gateway's JSON,
    and `items` turns the entities into `GatewayPayment`s only when they are asked for."""

    entities: list[dict[str, Any]]
    cursor: str | None
    read: Callable[[dict[str, Any]], GatewayPayment] = field(repr=False, compare=False)

    @cached_property
    def items(self) -> list[GatewayPayment]:
        return [self.read(entity) for entity in self.entities]

    def columns(self) -> PaymentColumns:
        # Both gateways name these four fields alike in a payment's JSON.
        entities = self.entities
        return PaymentColumns(
            ids=[entity["id"] for entity in entities],
            raw_statuses=[entity["status"] for entity in entities],
            amounts=[int(entity["amount"]) for entity in entities],
            currencies=[str(entity["currency"]).upper() for entity in entities],
        )


@dataclass(frozen=True)
class PaymentColumns:
    """The payments of a page, field by field: `ids[i]`, `raw_statuses[i]`, `amounts[i]` and
    `currencies[i]` are the page's i-th payment (the gateway's status, minor units, upper-case
    currency)."""

    ids: list[str]
    raw_statuses: list[str]
    amounts: list[int]
    currencies: list[str]


class Gateway(Protocol):
    name: str
    # How long the gateway honours an idempotency key after its first use (Stripe prunes
    # keys after 24 h); None when it documents no limit.
    key_ttl: timedelta | None

    def submit_refund(self, request: RefundRequest) -> GatewayRefund: ...

    def fetch_refund(self, gateway_payment_id: str, refund_id: str) -> GatewayRefund: ...

    def find_refund(self, request: RefundRequest) -> GatewayRefund | None:
        """The refund this attempt created, looked up among the payment's refunds by our
        reference, or None if the gateway has none."""
        ...

    def fetch_payment(self, payment_id: str) -> GatewayPayment: ...

    def list_payments(self, start: datetime, end: datetime) -> Iterator[list[GatewayPayment]]:
        """The payments created in [start, end), a page at a time."""
        ...

    def payment_page(self, start: datetime, end: datetime, cursor: str | None) -> PaymentPage:
        """The page of payments created in [start, end) that begins at `cursor` (None: the
        first page). [start, end) must be whole seconds."""
        ...
