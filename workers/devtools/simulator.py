"""A local stand-in for the Razorpay and Stripe REST APIs, with idempotency and fault injection.

The official SDKs run unmodified against it; tests and benchmarks use it instead of the internet.
"""

from __future__ import annotations

import bisect
import fnmatch
import hashlib
import hmac
import itertools
import json
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from workers.devtools.local_server import (
    Admission,
    BackgroundServer,
    FaultRule,
    Faults,
    serve_foreground,
)
from workers.gateways.stripe import STRIPE_API_VERSION

RAZORPAY = "razorpay"
STRIPE = "stripe"
GATEWAYS = (RAZORPAY, STRIPE)

ENDPOINTS = (
    "razorpay.payment.fetch",
    "razorpay.payment.list",
    "razorpay.payment.refunds",
    "razorpay.refund.create",
    "razorpay.refund.fetch",
    "stripe.payment_intent.fetch",
    "stripe.payment_intent.list",
    "stripe.refund.create",
    "stripe.refund.fetch",
    "stripe.refund.list",
)
FAULT_KINDS = ("latency", "401", "429", "500", "502", "503", "timeout", "lost")

PAYMENT_STATUSES = {
    RAZORPAY: frozenset({"created", "authorized", "captured", "failed"}),
    STRIPE: frozenset(
        {
            "requires_payment_method",
            "requires_confirmation",
            "requires_action",
            "processing",
            "requires_capture",
            "canceled",
            "succeeded",
        }
    ),
}
REFUND_STATUSES = {
    RAZORPAY: frozenset({"pending", "processed", "failed"}),
    STRIPE: frozenset({"pending", "requires_action", "succeeded", "failed", "canceled"}),
}
# A refund in one of these gave up: its amount can be refunded again.
RELEASED_REFUND_STATUSES = frozenset({"failed", "canceled"})
PAYMENT_FIELDS = frozenset(
    {"amount", "currency", "status", "id", "created", "order_id", "metadata"}
)
REFUNDABLE_PAYMENT_STATUS = {RAZORPAY: "captured", STRIPE: "succeeded"}
DEFAULT_CURRENCY = {RAZORPAY: "INR", STRIPE: "usd"}
PAYMENT_PREFIX = {RAZORPAY: ("pay", 14), STRIPE: ("pi", 24)}
REFUND_PREFIX = {RAZORPAY: ("rfnd", 14), STRIPE: ("re", 24)}

# The note / metadata keys holding the caller's own refund reference, first match wins:
# `refund_ref` by convention, `backstop_refund_id` as the refund adapters write it.
REFERENCE_KEYS = ("refund_ref", "backstop_refund_id")

STRIPE_KEY_TTL_SECONDS = 24 * 3600
RAZORPAY_IDEMPOTENCY_HEADER = "X-Refund-Idempotency"
RAZORPAY_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]{10,}")
RAZORPAY_MAX_COUNT = 100
STRIPE_MAX_LIMIT = 100
STRIPE_REFUND_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer"})
STRIPE_METADATA_PARAM = re.compile(r"metadata\[(.+)\]")

NOT_FOUND = "The id provided does not exist"
_NONE: Mapping[str, Any] = MappingProxyType({})


class SimulatorError(Exception):
    """A request the simulated gateway refuses; the HTTP layer shapes it per gateway."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


@dataclass(slots=True)
class _Payment:
    id: str
    amount: int
    currency: str
    status: str
    created: int
    order_id: str | None = None
    metadata: dict[str, str] | None = None
    refunded: int = 0
    # Created on the first refund: a bulk load of a million payments stays small.
    refund_ids: list[str] | None = None


@dataclass(slots=True)
class _Refund:
    gateway: str
    id: str
    payment_id: str
    amount: int
    currency: str
    status: str
    created: int
    notes: dict[str, str]
    receipt: str | None
    reason: str | None
    idempotency_key: str | None


@dataclass(slots=True)
class _IdempotencyRecord:
    fingerprint: str
    first_used: float
    refund_id: str
    response: dict[str, Any]


def _sort_key(payment: _Payment) -> tuple[int, str]:
    return (payment.created, payment.id)


def _is_int(value: Any) -> bool:
    return type(value) is int  # not bool, which is an int too


class SimulatorState:
    """Everything the simulated gateways know, behind one lock (the server is threaded)."""

    def __init__(
        self,
        *,
        razorpay_key_id: str = "rzp_test_sim",
        razorpay_key_secret: str = "sim_secret",
        stripe_api_key: str = "sk_test_sim",
        seed: int = 0,
    ) -> None:
        self.razorpay_key_id = razorpay_key_id
        self.razorpay_key_secret = razorpay_key_secret
        self.stripe_api_key = stripe_api_key
        self._lock = threading.Lock()
        self._seed = seed
        self._clear()

    def _clear(self) -> None:
        self._faults = Faults(self._seed)
        self._clock_offset = 0.0
        self._ids = itertools.count(1)
        self._payments: dict[str, dict[str, _Payment]] = {gw: {} for gw in GATEWAYS}
        # Payments sorted oldest first, rebuilt lazily after inserts, for windowed listing.
        self._ordered: dict[str, list[_Payment] | None] = {gw: [] for gw in GATEWAYS}
        self._refunds: dict[str, _Refund] = {}
        self._refund_order: dict[str, list[str]] = {gw: [] for gw in GATEWAYS}
        self._idempotency: dict[tuple[str, str], _IdempotencyRecord] = {}
        self._refund_outcome = {RAZORPAY: "processed", STRIPE: "succeeded"}
        self._requests: Counter[str] = Counter()
        self._stripe_versions: Counter[str] = Counter()
        self._refunds_created = 0
        self._by_key: Counter[str] = Counter()
        self._by_reference: Counter[str] = Counter()
        self._hooks: list[tuple[str, int, Callable[[SimulatorState], object]]] = []
        self._reshapers: dict[str, Callable[[Any], Any]] = {}

    # -- control ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget all payments, refunds, keys, faults and counters; credentials and seed stay."""
        with self._lock:
            self._clear()

    def seed(self, seed: int) -> None:
        """Restart the fault-decision RNG from `seed`, so a run's faults can be replayed."""
        if not _is_int(seed):
            raise ValueError("seed must be an integer")
        with self._lock:
            self._seed = seed
            self._faults.seed(seed)

    def now(self) -> float:
        return time.time() + self._clock_offset

    def advance(self, seconds: float) -> float:
        """Move the simulator's clock forward (to expire idempotency keys); returns now()."""
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            raise ValueError("seconds must be a non-negative number")
        with self._lock:
            self._clock_offset += seconds
        return self.now()

    def add_payment(
        self,
        gateway: str,
        *,
        amount: int,
        currency: str | None = None,
        status: str | None = None,
        id: str | None = None,
        created: int | None = None,
        order_id: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Create one payment (status defaults to captured / succeeded); returns its entity."""
        row = {
            "amount": amount,
            "currency": currency,
            "status": status,
            "id": id,
            "created": created,
            "order_id": order_id,
            "metadata": metadata,
        }
        (payment_id,) = self.add_payments(gateway, [row])
        with self._lock:
            return self._payment_entity(gateway, self._payments[gateway][payment_id])

    def add_payments(self, gateway: str, rows: Iterable[Mapping[str, Any]]) -> list[str]:
        """Create many payments at once (all or none); each row has `add_payment`'s keyword
        arguments. Returns their ids."""
        _check_gateway(gateway)
        with self._lock:
            table = self._payments[gateway]
            now = int(self.now())
            batch: dict[str, _Payment] = {}
            for row in rows:
                payment = self._build_payment(gateway, row, now, batch)
                batch[payment.id] = payment
            table.update(batch)
            if batch:
                self._ordered[gateway] = None
            return list(batch)

    def _build_payment(
        self, gateway: str, row: Mapping[str, Any], now: int, batch: Mapping[str, _Payment]
    ) -> _Payment:
        if not PAYMENT_FIELDS.issuperset(row):
            raise ValueError(f"unknown payment fields: {sorted(set(row) - PAYMENT_FIELDS)}")
        amount = row.get("amount")
        if not _is_int(amount) or amount <= 0:
            raise ValueError("amount must be a positive integer (in the currency's minor unit)")
        currency = row.get("currency") or DEFAULT_CURRENCY[gateway]
        if not isinstance(currency, str) or len(currency) != 3:
            raise ValueError("currency must be a three-letter code")
        status = sys.intern(row.get("status") or REFUNDABLE_PAYMENT_STATUS[gateway])
        if status not in PAYMENT_STATUSES[gateway]:
            raise ValueError(
                f"{gateway} payment status must be one of {sorted(PAYMENT_STATUSES[gateway])}"
            )
        created = row.get("created")
        if created is None:
            created = now
        elif not _is_int(created) or created < 0:
            raise ValueError("created must be a unix timestamp in seconds")
        payment_id = row.get("id")
        if payment_id is None:
            payment_id = self._new_id(PAYMENT_PREFIX[gateway], self._payments[gateway], batch)
        elif not isinstance(payment_id, str) or not payment_id.startswith(
            f"{PAYMENT_PREFIX[gateway][0]}_"
        ):
            raise ValueError(
                f"a {gateway} payment id must start with {PAYMENT_PREFIX[gateway][0]}_"
            )
        elif payment_id in self._payments[gateway] or payment_id in batch:
            raise ValueError(f"payment {payment_id} already exists")
        metadata = row.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        ):
            raise ValueError("metadata must map strings to strings")
        return _Payment(
            id=payment_id,
            amount=amount,
            # Interned: a million payments share three currency strings, not a million.
            currency=sys.intern(currency.upper() if gateway == RAZORPAY else currency.lower()),
            status=status,
            created=created,
            order_id=row.get("order_id"),
            metadata=metadata or None,
        )

    def _new_id(
        self, shape: tuple[str, int], taken: Mapping[str, Any], pending: Mapping[str, Any] = _NONE
    ) -> str:
        prefix, width = shape
        while True:
            candidate = f"{prefix}_{next(self._ids):0{width}d}"
            if candidate not in taken and candidate not in pending:
                return candidate

    def add_fault(
        self,
        endpoint: str,
        kind: str | int,
        rate: float = 1.0,
        *,
        latency_ms: int = 0,
        hang_seconds: float = 3.0,
        remaining: int | None = None,
    ) -> dict[str, Any]:
        """Add a fault rule; `endpoint` may use `*` wildcards (`razorpay.*`, `*`)."""
        kind = str(kind)
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {list(FAULT_KINDS)}")
        if not isinstance(endpoint, str) or not fnmatch.filter(ENDPOINTS, endpoint):
            raise ValueError(f"endpoint {endpoint!r} matches none of {list(ENDPOINTS)}")
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise ValueError("rate must be between 0 and 1")
        if not _is_int(latency_ms) or latency_ms < 0:
            raise ValueError("latency_ms must be a non-negative integer")
        if kind == "latency" and latency_ms == 0:
            raise ValueError("a latency fault needs latency_ms > 0")
        if isinstance(hang_seconds, bool) or not isinstance(hang_seconds, int | float):
            raise ValueError("hang_seconds must be a number")
        if hang_seconds < 0:
            raise ValueError("hang_seconds must not be negative")
        if remaining is not None and (not _is_int(remaining) or remaining < 1):
            raise ValueError("remaining must be a positive integer or null")
        rule = FaultRule(endpoint, kind, float(rate), latency_ms, float(hang_seconds), remaining)
        return self._faults.add(rule)

    def after_request(
        self, endpoint: str, callback: Callable[[SimulatorState], object], *, nth: int = 1
    ) -> None:
        """Run `callback(state)` once, right after the `nth` request to `endpoint` from now on
        has been answered: a payment created between two pages of a listing, say."""
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint {endpoint!r} is none of {list(ENDPOINTS)}")
        if not _is_int(nth) or nth < 1:
            raise ValueError("nth must be a positive integer")
        with self._lock:
            self._hooks.append((endpoint, self._requests[endpoint] + nth, callback))

    def _answered(self, endpoint: str) -> None:
        with self._lock:
            due = [
                hook
                for hook in self._hooks
                if hook[0] == endpoint and self._requests[endpoint] >= hook[1]
            ]
            self._hooks = [hook for hook in self._hooks if hook not in due]
        for _, _, callback in due:
            callback(self)

    def reshape(self, endpoint: str | None, transform: Callable[[Any], Any] | None) -> None:
        """Answer `endpoint` with `transform(body)` instead of its body (bytes are sent as they
        are, as JSON that is not), to test how the adapters read odd answers (in-process only);
        `reshape(None, None)` undoes them all."""
        with self._lock:
            if endpoint is None:
                self._reshapers.clear()
            elif transform is None:
                self._reshapers.pop(endpoint, None)
            else:
                self._reshapers[endpoint] = transform

    def _reshaped(self, endpoint: str, body: Any) -> Any:
        with self._lock:
            transform = self._reshapers.get(endpoint)
        return body if transform is None else transform(body)

    def clear_faults(self) -> None:
        self._faults.clear()

    def faults(self) -> list[dict[str, Any]]:
        return self._faults.rules()

    def set_refund_outcome(self, gateway: str, status: str) -> None:
        """The status new refunds of `gateway` are created with."""
        _check_gateway(gateway)
        if status not in REFUND_STATUSES[gateway]:
            raise ValueError(
                f"{gateway} refund status must be one of {sorted(REFUND_STATUSES[gateway])}"
            )
        with self._lock:
            self._refund_outcome[gateway] = status

    def settle_refund(self, refund_id: str, status: str) -> dict[str, Any]:
        """Move a refund to `status` (a pending one on to processed, say); returns its entity."""
        with self._lock:
            refund = self._refunds.get(refund_id)
            if refund is None:
                raise KeyError(f"no refund {refund_id}")
            if status not in REFUND_STATUSES[refund.gateway]:
                raise ValueError(
                    f"{refund.gateway} refund status must be one of "
                    f"{sorted(REFUND_STATUSES[refund.gateway])}"
                )
            payment = self._payments[refund.gateway][refund.payment_id]
            was_held = refund.status not in RELEASED_REFUND_STATUSES
            holds = status not in RELEASED_REFUND_STATUSES
            if holds and not was_held and payment.refunded + refund.amount > payment.amount:
                raise ValueError("reviving this refund would refund more than the payment")
            payment.refunded += (holds - was_held) * refund.amount
            refund.status = status
            return self._refund_entity(refund)

    def payment(self, gateway: str, payment_id: str) -> dict[str, Any]:
        """A payment's entity as the gateway would return it."""
        _check_gateway(gateway)
        with self._lock:
            found = self._payments[gateway].get(payment_id)
            if found is None:
                raise KeyError(f"no {gateway} payment {payment_id}")
            return self._payment_entity(gateway, found)

    def refund(self, refund_id: str) -> dict[str, Any]:
        """A refund's entity as its gateway would return it."""
        with self._lock:
            found = self._refunds.get(refund_id)
            if found is None:
                raise KeyError(f"no refund {refund_id}")
            return self._refund_entity(found)

    def set_payment_status(self, gateway: str, payment_id: str, status: str) -> dict[str, Any]:
        """Move a payment to `status` (a pending one captured later, say); returns its entity."""
        _check_gateway(gateway)
        if status not in PAYMENT_STATUSES[gateway]:
            raise ValueError(
                f"{gateway} payment status must be one of {sorted(PAYMENT_STATUSES[gateway])}"
            )
        with self._lock:
            payment = self._payments[gateway].get(payment_id)
            if payment is None:
                raise KeyError(f"no {gateway} payment {payment_id}")
            payment.status = sys.intern(status)
            return self._payment_entity(gateway, payment)

    def webhook_event(
        self, gateway: str, event_type: str, object_id: str, *, created: int | None = None
    ) -> str:
        """The raw body of the webhook the gateway sends about a payment or refund as it is
        now: Razorpay's `{"entity": "event", "event": ..., "payload": {...}}` (a refund event
        carries its payment too), Stripe's `{"id": "evt_...", "type": ..., "data":
        {"object": ...}}`. Sign it with `sign_razorpay` / `sign_stripe`."""
        _check_gateway(gateway)
        with self._lock:
            at = int(self.now()) if created is None else created
            refund = self._refunds.get(object_id)
            if refund is not None and refund.gateway == gateway:
                entity = self._refund_entity(refund)
                payment = self._payments[gateway][refund.payment_id]
                kind = "refund"
            else:
                payment = self._payments[gateway].get(object_id)
                if payment is None:
                    raise KeyError(f"no {gateway} payment or refund {object_id}")
                entity = self._payment_entity(gateway, payment)
                kind = "payment"
            if gateway == RAZORPAY:
                payload: dict[str, Any] = {kind: {"entity": entity}}
                if kind == "refund":
                    payload["payment"] = {"entity": self._payment_entity(gateway, payment)}
                body: dict[str, Any] = {
                    "entity": "event",
                    "account_id": "acc_simulator",
                    "event": event_type,
                    "contains": list(payload),
                    "payload": payload,
                    "created_at": at,
                }
            else:
                body = {
                    "id": f"evt_{next(self._ids):024d}",
                    "object": "event",
                    "api_version": STRIPE_API_VERSION,
                    "created": at,
                    "type": event_type,
                    "livemode": False,
                    "pending_webhooks": 1,
                    "request": {"id": None, "idempotency_key": None},
                    "data": {"object": entity},
                }
        return json.dumps(body, separators=(",", ":"))

    def effects(self) -> dict[str, Any]:
        """What the gateways actually did: a reference refunded twice is in `duplicates`."""
        with self._lock:
            return {
                "refunds_created": self._refunds_created,
                "by_idempotency_key": dict(self._by_key),
                "by_reference": dict(self._by_reference),
                "duplicates": sorted(ref for ref, n in self._by_reference.items() if n > 1),
            }

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": dict(self._requests),
                "faults_injected": self._faults.injected(),
                "stripe_versions": dict(self._stripe_versions),
            }

    # -- fault decisions ----------------------------------------------------------------------

    def _check_stripe_version(self, version: str | None) -> None:
        """Count the `Stripe-Version` a request names; like Stripe, refuse one it does not
        speak (this simulator speaks only the version the adapter targets)."""
        with self._lock:
            self._stripe_versions[version or "(account default)"] += 1
        if version and version != STRIPE_API_VERSION:
            raise SimulatorError(
                400,
                f"Invalid Stripe API version: {version} (this simulator speaks "
                f"{STRIPE_API_VERSION})",
            )

    def _admit(self, endpoint: str) -> Admission:
        """Count a request and decide its faults."""
        with self._lock:
            self._requests[endpoint] += 1
        return self._faults.admit(endpoint)

    # -- entities -----------------------------------------------------------------------------

    def _payment_entity(self, gateway: str, payment: _Payment) -> dict[str, Any]:
        if gateway == RAZORPAY:
            fully_refunded = payment.status == "captured" and payment.refunded >= payment.amount
            return {
                "id": payment.id,
                "entity": "payment",
                "amount": payment.amount,
                "currency": payment.currency,
                "status": "refunded" if fully_refunded else payment.status,
                "order_id": payment.order_id,
                "international": False,
                "amount_refunded": payment.refunded,
                "refund_status": _razorpay_refund_status(payment),
                "captured": payment.status == "captured",
                # Razorpay's API serialises empty notes as a JSON array.
                "notes": payment.metadata or [],
                "created_at": payment.created,
            }
        return {
            "id": payment.id,
            "object": "payment_intent",
            "amount": payment.amount,
            "amount_received": payment.amount if payment.status == "succeeded" else 0,
            "currency": payment.currency,
            "status": payment.status,
            "created": payment.created,
            "livemode": False,
            "metadata": dict(payment.metadata or {}),
        }

    def _refund_entity(self, refund: _Refund) -> dict[str, Any]:
        if refund.gateway == RAZORPAY:
            return {
                "id": refund.id,
                "entity": "refund",
                "amount": refund.amount,
                "currency": refund.currency,
                "payment_id": refund.payment_id,
                "notes": dict(refund.notes) or [],
                "receipt": refund.receipt,
                "acquirer_data": {},
                "created_at": refund.created,
                "batch_id": None,
                "status": refund.status,
                "speed_processed": "normal",
                "speed_requested": "normal",
            }
        return {
            "id": refund.id,
            "object": "refund",
            "amount": refund.amount,
            "currency": refund.currency,
            "payment_intent": refund.payment_id,
            "reason": refund.reason,
            "status": refund.status,
            "metadata": dict(refund.notes),
            "created": refund.created,
        }

    def _ordered_payments(self, gateway: str) -> list[_Payment]:
        ordered = self._ordered[gateway]
        if ordered is None:
            ordered = sorted(self._payments[gateway].values(), key=_sort_key)
            self._ordered[gateway] = ordered
        return ordered

    def _window(self, gateway: str, low: int | None, high: int | None) -> tuple[int, int]:
        """Index bounds in `_ordered_payments` of the payments created in [low, high]."""
        ordered = self._ordered_payments(gateway)
        start = 0 if low is None else bisect.bisect_left(ordered, (low, ""), key=_sort_key)
        end = (
            len(ordered)
            if high is None
            else bisect.bisect_left(ordered, (high + 1, ""), key=_sort_key)
        )
        return start, max(start, end)

    def _create_refund(
        self,
        gateway: str,
        payment: _Payment,
        amount: int,
        *,
        notes: dict[str, str],
        receipt: str | None,
        reason: str | None,
        key: str | None,
    ) -> _Refund:
        refund = _Refund(
            gateway=gateway,
            id=self._new_id(REFUND_PREFIX[gateway], self._refunds),
            payment_id=payment.id,
            amount=amount,
            currency=payment.currency,
            status=self._refund_outcome[gateway],
            created=int(self.now()),
            notes=notes,
            receipt=receipt,
            reason=reason,
            idempotency_key=key,
        )
        self._refunds[refund.id] = refund
        self._refund_order[gateway].append(refund.id)
        if payment.refund_ids is None:
            payment.refund_ids = []
        payment.refund_ids.append(refund.id)
        if refund.status not in RELEASED_REFUND_STATUSES:
            payment.refunded += amount
        self._refunds_created += 1
        if key is not None:
            self._by_key[key] += 1
        reference = next((notes[k] for k in REFERENCE_KEYS if k in notes), None)
        if reference is not None:
            self._by_reference[reference] += 1
        return refund

    # -- Razorpay -----------------------------------------------------------------------------

    def razorpay_fetch_payment(self, payment_id: str) -> dict[str, Any]:
        with self._lock:
            payment = self._payments[RAZORPAY].get(payment_id)
            if payment is None:
                raise SimulatorError(400, NOT_FOUND, param="id")
            return self._payment_entity(RAZORPAY, payment)

    def razorpay_list_payments(self, query: Mapping[str, str]) -> dict[str, Any]:
        """Razorpay's `GET /v1/payments`: newest first, `from`..`to` inclusive, count/skip."""
        _razorpay_only(query, {"from", "to", "count", "skip"})
        low = _razorpay_int(query, "from", None, minimum=0)
        high = _razorpay_int(query, "to", None, minimum=0)
        count = _razorpay_int(query, "count", 10, minimum=1, maximum=RAZORPAY_MAX_COUNT)
        skip = _razorpay_int(query, "skip", 0, minimum=0)
        with self._lock:
            ordered = self._ordered_payments(RAZORPAY)
            start, end = self._window(RAZORPAY, low, high)
            end -= skip
            page = ordered[max(start, end - count) : end] if end > start else []
            items = [self._payment_entity(RAZORPAY, p) for p in reversed(page)]
        return {"entity": "collection", "count": len(items), "items": items}

    def razorpay_create_refund(self, payment_id: str, body: Any, key: str | None) -> dict[str, Any]:
        """Razorpay's `POST /v1/payments/<id>/refund`, with `X-Refund-Idempotency` required."""
        if key is None or not RAZORPAY_KEY_PATTERN.fullmatch(key):
            raise SimulatorError(
                400,
                f"The {RAZORPAY_IDEMPOTENCY_HEADER} header is required: 10 or more characters "
                "of A-Z, a-z, 0-9, _ and -",
                param=RAZORPAY_IDEMPOTENCY_HEADER,
            )
        if not isinstance(body, dict):
            raise SimulatorError(400, "The request body must be a JSON object")
        fingerprint = json.dumps([payment_id, body], sort_keys=True)
        with self._lock:
            record = self._idempotency.get((RAZORPAY, key))
            if record is not None:
                if record.fingerprint != fingerprint:
                    raise SimulatorError(
                        400,
                        "idempotency key reused with a different request",
                        param=RAZORPAY_IDEMPOTENCY_HEADER,
                    )
                return self._refund_entity(self._refunds[record.refund_id])
            payment = self._payments[RAZORPAY].get(payment_id)
            if payment is None:
                raise SimulatorError(400, NOT_FOUND, param="id")
            _razorpay_only(body, {"amount", "speed", "notes", "receipt"})
            if payment.status != "captured":
                raise SimulatorError(
                    400, "The payment has not been captured, so it cannot be refunded"
                )
            left = payment.amount - payment.refunded
            if left <= 0:
                raise SimulatorError(400, "The payment has been fully refunded already")
            amount = body.get("amount", left)
            if not _is_int(amount) or amount <= 0:
                raise SimulatorError(
                    400, "The amount must be an integer of at least 1", param="amount"
                )
            if amount > left:
                raise SimulatorError(
                    400,
                    f"The amount must not exceed the amount not yet refunded ({left})",
                    param="amount",
                )
            if body.get("speed", "normal") not in ("normal", "optimum"):
                raise SimulatorError(400, "The selected speed is invalid.", param="speed")
            notes = body.get("notes") or {}
            if not isinstance(notes, dict) or not all(
                isinstance(v, str | int | float) for v in notes.values()
            ):
                raise SimulatorError(400, "The notes must be a map of strings", param="notes")
            receipt = body.get("receipt")
            if receipt is not None and not isinstance(receipt, str):
                raise SimulatorError(400, "The receipt must be a string.", param="receipt")
            refund = self._create_refund(
                RAZORPAY,
                payment,
                amount,
                notes={str(k): str(v) for k, v in notes.items()},
                receipt=receipt,
                reason=None,
                key=key,
            )
            entity = self._refund_entity(refund)
            self._idempotency[(RAZORPAY, key)] = _IdempotencyRecord(
                fingerprint, self.now(), refund.id, entity
            )
            return entity

    def razorpay_list_refunds(self, payment_id: str, query: Mapping[str, str]) -> dict[str, Any]:
        _razorpay_only(query, {"count", "skip"})
        count = _razorpay_int(query, "count", 10, minimum=1, maximum=RAZORPAY_MAX_COUNT)
        skip = _razorpay_int(query, "skip", 0, minimum=0)
        with self._lock:
            payment = self._payments[RAZORPAY].get(payment_id)
            if payment is None:
                raise SimulatorError(400, NOT_FOUND, param="id")
            newest_first = list(reversed(payment.refund_ids or []))
            items = [self._refund_entity(self._refunds[r]) for r in newest_first[skip:][:count]]
        return {"entity": "collection", "count": len(items), "items": items}

    def razorpay_fetch_refund(
        self, refund_id: str, payment_id: str | None = None
    ) -> dict[str, Any]:
        with self._lock:
            refund = self._refunds.get(refund_id)
            if (
                refund is None
                or refund.gateway != RAZORPAY
                or (payment_id is not None and refund.payment_id != payment_id)
            ):
                raise SimulatorError(400, NOT_FOUND, param="id")
            return self._refund_entity(refund)

    # -- Stripe -------------------------------------------------------------------------------

    def stripe_fetch_payment_intent(self, intent_id: str) -> dict[str, Any]:
        with self._lock:
            payment = self._payments[STRIPE].get(intent_id)
            if payment is None:
                raise _stripe_missing("payment_intent", intent_id, "id")
            return self._payment_entity(STRIPE, payment)

    def stripe_list_payment_intents(self, query: Mapping[str, str]) -> dict[str, Any]:
        """Stripe's `GET /v1/payment_intents`: newest first, `created[...]` filters,
        `limit` and the `starting_after` cursor."""
        lows = (("created", 0), ("created[gte]", 0), ("created[gt]", 1))
        highs = (("created", 0), ("created[lte]", 0), ("created[lt]", 1))
        _stripe_only(query, {name for name, _ in lows + highs} | {"limit", "starting_after"})
        # Stripe's bounds are whole seconds: make them all inclusive.
        low = max((_stripe_int(query, n, 0) + s for n, s in lows if n in query), default=None)
        high = min((_stripe_int(query, n, 0) - s for n, s in highs if n in query), default=None)
        limit = _stripe_limit(query)
        cursor = query.get("starting_after")
        with self._lock:
            ordered = self._ordered_payments(STRIPE)
            start, end = self._window(STRIPE, low, high)
            if cursor is not None:
                after = self._payments[STRIPE].get(cursor)
                if after is None:
                    raise _stripe_missing("payment_intent", cursor, "starting_after")
                end = min(end, bisect.bisect_left(ordered, _sort_key(after), key=_sort_key))
            first = max(start, end - limit)
            page = ordered[first:end] if end > start else []
            data = [self._payment_entity(STRIPE, p) for p in reversed(page)]
        return _stripe_list("/v1/payment_intents", data, has_more=first > start)

    def stripe_create_refund(
        self, params: Mapping[str, str], key: str | None
    ) -> tuple[dict[str, Any], bool]:
        """Stripe's `POST /v1/refunds`: returns the refund and whether it is a replay."""
        fingerprint = json.dumps(sorted(params.items()))
        with self._lock:
            now = self.now()
            if key is not None:
                record = self._idempotency.get((STRIPE, key))
                if record is not None and now - record.first_used >= STRIPE_KEY_TTL_SECONDS:
                    # Stripe prunes keys after 24 hours: the same key is then a new request.
                    del self._idempotency[(STRIPE, key)]
                    record = None
                if record is not None:
                    if record.fingerprint != fingerprint:
                        raise SimulatorError(
                            400,
                            "Keys for idempotent requests can only be used with the same "
                            "parameters they were first used with. Try using a key other than "
                            f"'{key}' if you meant to execute a different request.",
                            code="idempotency_error",
                        )
                    return record.response, True
            refund = self._stripe_refund(params, key)
            entity = self._refund_entity(refund)
            if key is not None:
                self._idempotency[(STRIPE, key)] = _IdempotencyRecord(
                    fingerprint, now, refund.id, entity
                )
            return entity, False

    def _stripe_refund(self, params: Mapping[str, str], key: str | None) -> _Refund:
        metadata: dict[str, str] = {}
        for name, value in params.items():
            match = STRIPE_METADATA_PARAM.fullmatch(name)
            if match:
                metadata[match.group(1)] = value
            elif name not in ("payment_intent", "amount", "reason"):
                raise SimulatorError(400, f"Received unknown parameter: {name}", param=name)
        intent_id = params.get("payment_intent")
        if not intent_id:
            raise SimulatorError(
                400, "Missing required param: payment_intent.", param="payment_intent"
            )
        payment = self._payments[STRIPE].get(intent_id)
        if payment is None:
            raise _stripe_missing("payment_intent", intent_id, "payment_intent", status=400)
        if payment.status != "succeeded":
            raise SimulatorError(
                400,
                f"This PaymentIntent ({intent_id}) does not have a successful charge to refund.",
                param="payment_intent",
            )
        left = payment.amount - payment.refunded
        if left <= 0:
            raise SimulatorError(
                400,
                f"PaymentIntent {intent_id} has already been refunded.",
                param="payment_intent",
                code="charge_already_refunded",
            )
        amount = _stripe_int(params, "amount", left)
        if amount < 1:
            raise SimulatorError(
                400, "This value must be greater than or equal to 1.", param="amount"
            )
        if amount > left:
            raise SimulatorError(
                400,
                f"Refund amount ({amount}) is greater than unrefunded amount on charge ({left})",
                param="amount",
                code="amount_too_large",
            )
        reason = params.get("reason")
        if reason is not None and reason not in STRIPE_REFUND_REASONS:
            raise SimulatorError(
                400,
                "Invalid reason: must be one of duplicate, fraudulent, or requested_by_customer",
                param="reason",
            )
        return self._create_refund(
            STRIPE, payment, amount, notes=metadata, receipt=None, reason=reason, key=key
        )

    def stripe_fetch_refund(self, refund_id: str) -> dict[str, Any]:
        with self._lock:
            refund = self._refunds.get(refund_id)
            if refund is None or refund.gateway != STRIPE:
                raise _stripe_missing("refund", refund_id, "id")
            return self._refund_entity(refund)

    def stripe_list_refunds(self, query: Mapping[str, str]) -> dict[str, Any]:
        """Stripe's `GET /v1/refunds`, optionally of one `payment_intent`, newest first."""
        _stripe_only(query, {"payment_intent", "limit", "starting_after"})
        limit = _stripe_limit(query)
        with self._lock:
            intent_id = query.get("payment_intent")
            if intent_id is None:
                ids = self._refund_order[STRIPE]
            else:
                payment = self._payments[STRIPE].get(intent_id)
                if payment is None:
                    raise _stripe_missing("payment_intent", intent_id, "payment_intent", 400)
                ids = payment.refund_ids or []
            newest_first = ids[::-1]
            cursor = query.get("starting_after")
            if cursor is not None:
                if cursor not in newest_first:
                    raise _stripe_missing("refund", cursor, "starting_after")
                newest_first = newest_first[newest_first.index(cursor) + 1 :]
            data = [self._refund_entity(self._refunds[r]) for r in newest_first[:limit]]
        return _stripe_list("/v1/refunds", data, has_more=len(newest_first) > limit)


def sign_razorpay(body: str, secret: str) -> str:
    """`X-Razorpay-Signature`: the hex HMAC-SHA256 of the raw body with the webhook secret."""
    return hmac.new(secret.encode(), body.encode(), hashlib.sha256).hexdigest()


def sign_stripe(body: str, secret: str, timestamp: int | None = None) -> str:
    """`Stripe-Signature`: `t=<unix time>,v1=<hex HMAC-SHA256 of "t.body">`."""
    at = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{at}.{body}".encode(), hashlib.sha256).hexdigest()
    return f"t={at},v1={digest}"


def _check_gateway(gateway: str) -> None:
    if gateway not in GATEWAYS:
        raise ValueError(f"gateway must be one of {list(GATEWAYS)}")


def _razorpay_refund_status(payment: _Payment) -> str | None:
    if payment.refunded <= 0:
        return None
    return "full" if payment.refunded >= payment.amount else "partial"


def _razorpay_only(given: Mapping[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(given) - allowed)
    if extra:
        raise SimulatorError(
            400, f"{', '.join(extra)} is/are not required and should not be sent", param=extra[0]
        )


def _razorpay_int(
    query: Mapping[str, str],
    name: str,
    default: int | None,
    *,
    minimum: int,
    maximum: int | None = None,
) -> int | None:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SimulatorError(400, f"The {name} must be an integer.", param=name) from None
    if value < minimum:
        raise SimulatorError(400, f"The {name} must be at least {minimum}.", param=name)
    if maximum is not None and value > maximum:
        raise SimulatorError(400, f"The {name} may not be greater than {maximum}.", param=name)
    return value


def _stripe_only(given: Mapping[str, str], allowed: set[str]) -> None:
    for name in given:
        if name not in allowed:
            raise SimulatorError(400, f"Received unknown parameter: {name}", param=name)


def _stripe_int(params: Mapping[str, str], name: str, default: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SimulatorError(400, f"Invalid integer: {raw}", param=name) from None


def _stripe_limit(query: Mapping[str, str]) -> int:
    limit = _stripe_int(query, "limit", 10)
    if not 1 <= limit <= STRIPE_MAX_LIMIT:
        raise SimulatorError(
            400,
            f"This value must be greater than or equal to 1 and less than or equal to "
            f"{STRIPE_MAX_LIMIT}.",
            param="limit",
        )
    return limit


def _stripe_missing(what: str, object_id: str, param: str, status: int = 404) -> SimulatorError:
    return SimulatorError(
        status, f"No such {what}: '{object_id}'", param=param, code="resource_missing"
    )


def _stripe_list(url: str, data: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": has_more, "url": url}


# -- HTTP ---------------------------------------------------------------------------------------

Reply = tuple[dict[str, Any], dict[str, str]]


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body), status=status, headers=dict(headers or {}), mimetype="application/json"
    )


def _error_response(gateway: str, error: SimulatorError) -> Response:
    if gateway == RAZORPAY:
        if error.status == 502:
            code = "GATEWAY_ERROR"
        elif error.status >= 500:
            code = "SERVER_ERROR"
        else:
            code = "BAD_REQUEST_ERROR"
        body: dict[str, Any] = {
            "code": code,
            "description": error.message,
            "source": "NA",
            "step": "NA",
            "reason": "NA",
            "metadata": {},
        }
        if error.param:
            body["field"] = error.param
        return _json({"error": body}, error.status)
    if error.code == "idempotency_error":
        body = {"type": "idempotency_error", "message": error.message}
    else:
        kind = "api_error" if error.status >= 500 else "invalid_request_error"
        body = {"type": kind, "message": error.message}
        if error.code:
            body["code"] = error.code
        if error.param:
            body["param"] = error.param
    return _json({"error": body}, error.status)


def _fault_error(gateway: str, status: int) -> SimulatorError:
    """What the gateway says when it is overloaded or broken, or (401) when it stops taking
    our keys for a while; never the result of an effect."""
    if status == 401:
        return _auth_error(gateway)
    if status == 429:
        if gateway == RAZORPAY:
            return SimulatorError(429, "Too many requests")
        # Stripe's 429 body is an invalid_request_error with code rate_limit.
        return SimulatorError(
            429,
            "Request rate limit exceeded. Learn more about rate limits here "
            "https://stripe.com/docs/rate-limits.",
            code="rate_limit",
        )
    if gateway == RAZORPAY:
        if status == 502:
            return SimulatorError(502, "The gateway did not respond in time; please retry")
        return SimulatorError(
            status, "The server encountered an error. The incident has been reported to admins."
        )
    return SimulatorError(
        status,
        "An unknown error occurred. Please retry the request (with the same idempotency key).",
    )


def _auth_error(gateway: str) -> SimulatorError:
    if gateway == RAZORPAY:
        return SimulatorError(401, "Authentication failed")
    return SimulatorError(401, "Invalid API Key provided")


def _auth_scheme() -> str:
    return request.headers.get("Authorization", "").partition(" ")[0].lower()


def create_app(state: SimulatorState) -> Flask:
    """The Flask app serving `state`: both gateways' endpoints and the `/_sim/` control API."""
    app = Flask(__name__)

    def authorized(gateway: str) -> bool:
        if gateway == RAZORPAY:
            auth = request.authorization
            return (
                auth is not None
                and auth.type == "basic"
                and auth.username == state.razorpay_key_id
                and auth.password == state.razorpay_key_secret
            )
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and token == state.stripe_api_key

    def serve(endpoint: str, operation: Callable[[], Reply]) -> Response:
        gateway = endpoint.partition(".")[0]
        admission = state._admit(endpoint)
        if admission.latency_seconds:
            time.sleep(admission.latency_seconds)
        fault = admission.fault
        if fault is not None and fault.kind == "timeout":
            time.sleep(fault.hang_seconds)
            return _error_response(gateway, _fault_error(gateway, 504))
        if fault is not None and fault.kind.isdigit():
            return _error_response(gateway, _fault_error(gateway, int(fault.kind)))
        try:
            if not authorized(gateway):
                raise _auth_error(gateway)
            if gateway == STRIPE:
                state._check_stripe_version(request.headers.get("Stripe-Version"))
            body, headers = operation()
            answer = state._reshaped(endpoint, body)
            response = (
                Response(answer, status=200, headers=dict(headers), mimetype="application/json")
                if isinstance(answer, bytes)  # a body that is not JSON at all
                else _json(answer, 200, headers)
            )
        except SimulatorError as exc:
            response = _error_response(gateway, exc)
        state._answered(endpoint)
        if fault is not None and fault.kind == "lost":
            # The effect is done and recorded; hanging now makes the client give up on it.
            time.sleep(fault.hang_seconds)
        return response

    def query() -> dict[str, str]:
        return request.args.to_dict()

    @app.get("/v1/payments/<payment_id>")
    def razorpay_payment_fetch(payment_id: str) -> Response:
        return serve(
            "razorpay.payment.fetch", lambda: (state.razorpay_fetch_payment(payment_id), {})
        )

    @app.get("/v1/payments")
    def razorpay_payment_list() -> Response:
        return serve("razorpay.payment.list", lambda: (state.razorpay_list_payments(query()), {}))

    @app.post("/v1/payments/<payment_id>/refund")
    def razorpay_refund_create(payment_id: str) -> Response:
        def operation() -> Reply:
            body = request.get_json(silent=True)
            key = request.headers.get(RAZORPAY_IDEMPOTENCY_HEADER)
            return state.razorpay_create_refund(payment_id, body, key), {}

        return serve("razorpay.refund.create", operation)

    @app.get("/v1/payments/<payment_id>/refunds")
    def razorpay_payment_refunds(payment_id: str) -> Response:
        return serve(
            "razorpay.payment.refunds",
            lambda: (state.razorpay_list_refunds(payment_id, query()), {}),
        )

    @app.get("/v1/payments/<payment_id>/refunds/<refund_id>")
    def razorpay_payment_refund(payment_id: str, refund_id: str) -> Response:
        return serve(
            "razorpay.refund.fetch",
            lambda: (state.razorpay_fetch_refund(refund_id, payment_id), {}),
        )

    @app.get("/v1/refunds/<refund_id>")
    def refund_fetch(refund_id: str) -> Response:
        # Both gateways own this path: tell them apart by auth scheme, else by id prefix.
        scheme = _auth_scheme()
        if scheme == "bearer" or (scheme != "basic" and refund_id.startswith("re_")):
            return serve("stripe.refund.fetch", lambda: (state.stripe_fetch_refund(refund_id), {}))
        return serve("razorpay.refund.fetch", lambda: (state.razorpay_fetch_refund(refund_id), {}))

    @app.get("/v1/payment_intents/<intent_id>")
    def stripe_payment_intent_fetch(intent_id: str) -> Response:
        return serve(
            "stripe.payment_intent.fetch",
            lambda: (state.stripe_fetch_payment_intent(intent_id), {}),
        )

    @app.get("/v1/payment_intents")
    def stripe_payment_intent_list() -> Response:
        return serve(
            "stripe.payment_intent.list", lambda: (state.stripe_list_payment_intents(query()), {})
        )

    @app.post("/v1/refunds")
    def stripe_refund_create() -> Response:
        def operation() -> Reply:
            key = request.headers.get("Idempotency-Key")
            body, replayed = state.stripe_create_refund(request.form.to_dict(), key)
            headers = {"Idempotency-Key": key} if key else {}
            if replayed:
                headers["Idempotent-Replayed"] = "true"
            return body, headers

        return serve("stripe.refund.create", operation)

    @app.get("/v1/refunds")
    def stripe_refund_list() -> Response:
        return serve("stripe.refund.list", lambda: (state.stripe_list_refunds(query()), {}))

    def control(operation: Callable[[dict[str, Any]], Any]) -> Response:
        """Run a control operation on the JSON body; one returning nothing answers {"ok": true}."""
        body = request.get_json(silent=True)
        if body is None:
            body = {}
        if not isinstance(body, dict):
            return _json({"error": "the body must be a JSON object"}, 400)
        try:
            result = operation(body)
        except (ValueError, TypeError) as exc:
            return _json({"error": str(exc)}, 400)
        except KeyError as exc:
            return _json({"error": str(exc.args[0] if exc.args else exc)}, 404)
        return _json({"ok": True} if result is None else result)

    @app.post("/_sim/reset")
    def sim_reset() -> Response:
        return control(lambda _: state.reset())

    @app.post("/_sim/payments")
    def sim_payment() -> Response:
        return control(lambda body: state.add_payment(**body))

    @app.post("/_sim/payments/bulk")
    def sim_payments_bulk() -> Response:
        return control(lambda body: {"ids": state.add_payments(body["gateway"], body["rows"])})

    @app.post("/_sim/faults")
    def sim_fault_add() -> Response:
        return control(lambda body: state.add_fault(**body))

    @app.get("/_sim/faults")
    def sim_fault_list() -> Response:
        return control(lambda _: state.faults())

    @app.delete("/_sim/faults")
    def sim_fault_clear() -> Response:
        return control(lambda _: state.clear_faults())

    @app.post("/_sim/refund_outcome")
    def sim_refund_outcome() -> Response:
        return control(lambda body: state.set_refund_outcome(body["gateway"], body["status"]))

    @app.post("/_sim/refunds/<refund_id>/settle")
    def sim_refund_settle(refund_id: str) -> Response:
        return control(lambda body: state.settle_refund(refund_id, body["status"]))

    @app.post("/_sim/clock/advance")
    def sim_clock_advance() -> Response:
        return control(lambda body: {"now": state.advance(body["seconds"])})

    @app.post("/_sim/seed")
    def sim_seed() -> Response:
        return control(lambda body: state.seed(body["seed"]))

    @app.get("/_sim/effects")
    def sim_effects() -> Response:
        return control(lambda _: state.effects())

    @app.get("/_sim/stats")
    def sim_stats() -> Response:
        return control(lambda _: state.stats())

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        # SDKs parse every error body as JSON, so unknown paths and methods answer in kind.
        status = exc.code or 500
        if request.path.startswith("/_sim/"):
            return _json({"error": exc.description}, status)
        gateway = STRIPE if _auth_scheme() == "bearer" else RAZORPAY
        return _error_response(gateway, SimulatorError(status, exc.description or exc.name))

    return app


class SimulatorServer(BackgroundServer):
    """The simulator on a threaded werkzeug server in a daemon thread; `.url` is its base URL.

    Use as a context manager, or call `stop()`.
    """

    def __init__(
        self, state: SimulatorState | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.state = state if state is not None else SimulatorState()
        super().__init__(create_app(self.state), host, port, "gateway-simulator")

    def gateway_env(self) -> dict[str, str]:
        """The settings that point both gateways' real SDKs at this simulator."""
        return {
            "RAZORPAY_KEY_ID": self.state.razorpay_key_id,
            "RAZORPAY_KEY_SECRET": self.state.razorpay_key_secret,
            "RAZORPAY_BASE_URL": self.url,
            "STRIPE_API_KEY": self.state.stripe_api_key,
            "STRIPE_API_BASE": self.url,
        }


def serve(
    host: str,
    port: int,
    *,
    razorpay_key_id: str = "rzp_test_sim",
    razorpay_key_secret: str = "sim_secret",
    stripe_api_key: str = "sk_test_sim",
    setup: Callable[[SimulatorState], object] | None = None,
) -> None:
    """Run the simulator in the foreground until interrupted; `setup` prepares its state."""
    state = SimulatorState(
        razorpay_key_id=razorpay_key_id,
        razorpay_key_secret=razorpay_key_secret,
        stripe_api_key=stripe_api_key,
    )
    if setup is not None:
        setup(state)
    serve_foreground(
        create_app(state), host, port, "gateway simulator on {url} (control API under /_sim/)"
    )
