"""A circuit breaker per gateway, shared by every worker process through Redis (pybreaker).

Failures that say the gateway is unwell (transient errors, unknown outcomes) count; refusals
do not. While the breaker is open, work for that gateway is deferred without being sent.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import pybreaker

from workers.errors import Defer
from workers.gateways.base import (
    CircuitOpen,
    Gateway,
    GatewayPayment,
    GatewayPermanent,
    GatewayRefund,
    PaymentPage,
    RefundRequest,
)

T = TypeVar("T")


class Breaker(pybreaker.CircuitBreaker):
    """pybreaker's breaker, keeping the storage it was given in sight: when the breaker opened
    is the storage's to say (`opened_at`), and the breaker has no public way to ask it."""

    def __init__(self, storage: pybreaker.CircuitBreakerStorage, **options: Any) -> None:
        super().__init__(state_storage=storage, **options)
        self.storage = storage


def make_breaker(name: str, *, fail_max: int, reset_seconds: float, redis: Any | None) -> Breaker:
    """`redis` shares the state between processes; without it (the embedded default) each
    process keeps its own."""
    storage: pybreaker.CircuitBreakerStorage = (
        pybreaker.CircuitRedisStorage(
            pybreaker.STATE_CLOSED, redis, namespace=f"backstop:breaker:{name}"
        )
        if redis is not None
        else pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    )
    return Breaker(
        storage,
        fail_max=fail_max,
        reset_timeout=reset_seconds,
        exclude=[GatewayPermanent],
        name=name,
        # The call that trips the breaker must still tell its own outcome: a lost response
        # is not "nothing was sent".
        throw_new_error_on_trip=False,
    )


class Breakers:
    """A gateway's breaker for the calling thread.

    `CircuitBreaker.call` holds the breaker object's lock for the whole call, so threads that
    share one object talk to the gateway one at a time. With Redis the state is shared anyway
    (between processes, and so between threads): each thread gets its own breaker object on
    that state, as each process does. Without Redis the state lives in the object, so all
    threads share one.
    """

    def __init__(
        self, name: str, *, fail_max: int, reset_seconds: float, redis: Any | None
    ) -> None:
        self._make = functools.partial(
            make_breaker, name, fail_max=fail_max, reset_seconds=reset_seconds, redis=redis
        )
        self._shared = self._make() if redis is None else None
        self._local = threading.local()

    def __call__(self) -> Breaker:
        if self._shared is not None:
            return self._shared
        breaker = getattr(self._local, "breaker", None)
        if breaker is None:
            breaker = self._local.breaker = self._make()
        return breaker


class GuardedGateway:
    """A gateway whose every call goes through its breaker."""

    def __init__(self, gateway: Gateway, breakers: Callable[[], Breaker]) -> None:
        self._gateway, self._breakers = gateway, breakers
        self.name = gateway.name

    @property
    def adapter(self) -> Gateway:
        """The adapter itself, for a caller that reads the breaker's state instead of calling
        through it."""
        return self._gateway

    @property
    def breaker(self) -> Breaker:
        return self._breakers()

    def open_for(self) -> float:
        """Seconds until the breaker lets a trial call through; 0 when calls may go now."""
        if self.breaker.current_state != pybreaker.STATE_OPEN:
            return 0.0
        opened = self.breaker.storage.opened_at
        if opened is None:
            return 0.0
        return max(0.0, opened.timestamp() + self.breaker.reset_timeout - time.time())

    def state(self) -> str:
        return str(self.breaker.current_state)

    def _call(self, call: Callable[..., T], *args: Any) -> T:
        try:
            return self.breaker.call(call, *args)
        except pybreaker.CircuitBreakerError as exc:
            raise CircuitOpen(f"{self.name}: circuit breaker is open") from exc

    def submit_refund(self, request: RefundRequest) -> GatewayRefund:
        return self._call(self._gateway.submit_refund, request)

    def fetch_refund(self, gateway_payment_id: str, refund_id: str) -> GatewayRefund:
        return self._call(self._gateway.fetch_refund, gateway_payment_id, refund_id)

    def find_refund(self, request: RefundRequest) -> GatewayRefund | None:
        return self._call(self._gateway.find_refund, request)

    def fetch_payment(self, payment_id: str) -> GatewayPayment:
        return self._call(self._gateway.fetch_payment, payment_id)

    def payment_page(self, start: datetime, end: datetime, cursor: str | None) -> PaymentPage:
        return self._call(self._gateway.payment_page, start, end, cursor)


def open_seconds(gateway: Gateway) -> float:
    """Seconds until the gateway's breaker lets calls through (0 without a breaker)."""
    open_for = getattr(gateway, "open_for", None)
    return float(open_for()) if open_for else 0.0


def defer_while_open(gateway: Gateway) -> None:
    """Nothing is claimed or sent while the gateway's breaker is open: come back after it."""
    seconds = open_seconds(gateway)
    if seconds > 0:
        raise Defer(seconds, f"{gateway.name} circuit breaker is open")
