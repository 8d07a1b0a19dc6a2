"""The one small interface both gateway adapters implement, and how their outcomes sort.

Every adapter call either returns what the gateway said or raises one of three errors:
`GatewayTransient` (nothing happened; try again later with the same key), `GatewayPermanent`
(the gateway refused; retrying the same request cannot help), or `OutcomeUnknown` (the
request may have taken effect: ask the gateway before doing anything else).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Protocol, TypeVar

from workers.errors import PermanentError, TransientError

T = TypeVar("T")


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
    after sending, an answer we cannot read, anything unexpected): resolve by asking the
    gateway, never by sending a new request blindly. Retried like a transient error: the
    next attempt asks the gateway first (`workers.refunds.submission.call_gateway`)."""


class GatewayMalformed(GatewayTransient):
    """The gateway answered in a shape we cannot read: a field missing, null or of the wrong
    type (the message names it). On a call that moves money the adapter raises
    `OutcomeUnknown` instead: the request was answered, so it may have taken effect."""


def maybe_done(effectful: bool, message: str) -> Exception:
    """What a call's failure is when it may have reached the gateway: on a call that moves
    money an unknown outcome, on a read a transient error."""
    return OutcomeUnknown(message) if effectful else GatewayTransient(message)


def unexpected(where: str, exc: Exception, effectful: bool) -> Exception:
    """An exception the SDK does not document: sorted like a lost answer."""
    return maybe_done(effectful, f"{where}: unexpected {type(exc).__name__}: {exc}")


def read_answer(answer: Any, read: Callable[[Any, str], T], where: str, effectful: bool) -> T:
    """`read(answer, where)`; an answer it cannot read is, on a call that moves money, an
    unknown outcome: the gateway answered 200, so the request may well have taken effect."""
    try:
        return read(answer, where)
    except GatewayMalformed as exc:
        if effectful:
            raise OutcomeUnknown(f"{exc}; the request may have taken effect") from exc
        raise


def need(entity: Any, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    """`entity[name]`, which must be there and of type `kind` (a bool is no int)."""
    if not isinstance(entity, dict):
        raise GatewayMalformed(f"{where}: expected an object, got {type(entity).__name__}")
    value = entity.get(name)
    if value is None:
        raise GatewayMalformed(f"{where}: the answer has no {name!r}")
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise GatewayMalformed(f"{where}: {name!r} is {type(value).__name__}, expected {expected}")
    return value


def timestamp(entity: Any, name: str, where: str) -> datetime:
    """`entity[name]`, epoch seconds, as an aware UTC datetime."""
    seconds = need(entity, name, int, where)
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, ValueError, OSError):
        raise GatewayMalformed(f"{where}: {name!r} is no time: {seconds}") from None


def items_of(page: Any, name: str, where: str) -> list[Any]:
    """A listing's list of entities (`items` for Razorpay, `data` for Stripe)."""
    found = need(page, name, list, where)
    return list(found)


def reference_key(entity: Any, name: str, where: str) -> str | None:
    """The idempotency key we wrote into a refund's notes/metadata, or None when it carries
    none. Notes of a shape we cannot read are an error: the refund might be ours."""
    notes = entity.get(name) if isinstance(entity, dict) else None
    if notes is None or notes == []:  # Razorpay serialises empty notes as []
        return None
    if not isinstance(notes, dict):
        raise GatewayMalformed(f"{where}: {name!r} is {type(notes).__name__}, expected object")
    key = notes.get("backstop_idempotency_key")
    return key if isinstance(key, str) else None


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
        # Both gateways name these four fields alike in a payment's JSON. Read straight from
        # it (a million a night); a page with anything odd in it is read field by field
        # instead, which names the field.
        entities = self.entities
        try:
            columns = PaymentColumns(
                ids=[entity["id"] for entity in entities],
                raw_statuses=[entity["status"] for entity in entities],
                amounts=[entity["amount"] for entity in entities],
                currencies=[entity["currency"].upper() for entity in entities],
            )
            if all(type(v) is str for v in columns.ids + columns.raw_statuses) and all(
                type(v) is int for v in columns.amounts
            ):
                return columns
        except (KeyError, TypeError, AttributeError):
            pass
        return PaymentColumns(
            ids=[need(e, "id", str, "payment") for e in entities],
            raw_statuses=[need(e, "status", str, "payment") for e in entities],
            amounts=[need(e, "amount", int, "payment") for e in entities],
            currencies=[need(e, "currency", str, "payment").upper() for e in entities],
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

    def submit_refund(self, request: RefundRequest) -> GatewayRefund: ...

    def fetch_refund(self, gateway_payment_id: str, refund_id: str) -> GatewayRefund: ...

    def find_refund(self, request: RefundRequest) -> GatewayRefund | None:
        """The refund this attempt created, looked up among the payment's refunds by our
        reference, or None if the gateway has none."""
        ...

    def fetch_payment(self, payment_id: str) -> GatewayPayment: ...

    def payment_page(self, start: datetime, end: datetime, cursor: str | None) -> PaymentPage:
        """The page of payments created in [start, end) that begins at `cursor` (None: the
        first page). [start, end) must be whole seconds."""
        ...
