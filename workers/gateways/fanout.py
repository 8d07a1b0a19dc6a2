"""Asking a gateway about many things at once: a bounded pool of threads per process, and the
payment lookup that reconciliation and the in-flight janitor share.

Each answer is the gateway's object or the sorted error it answered with, so one odd answer
never costs the others theirs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from workers.gateways.base import (
    Gateway,
    GatewayPayment,
    GatewayPermanent,
    GatewayTransient,
    OutcomeUnknown,
)

_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}


def thread_pool(size: int) -> ThreadPoolExecutor:
    """A pool of `size` threads for gateway calls, one per process (threads do not survive a
    fork), so the SDKs' HTTP connections (kept per thread by Stripe's) are reused from one
    round to the next."""
    key = (os.getpid(), size)
    if key not in _pools:
        _pools[key] = ThreadPoolExecutor(max_workers=size, thread_name_prefix="gateway")
    return _pools[key]


def fetch_payments(
    gateway: Gateway, payment_ids: Sequence[str | None], concurrency: int
) -> dict[str, GatewayPayment | Exception]:
    """Each payment as its gateway has it, or the error it answered with, `concurrency`
    requests at a time."""
    wanted = sorted({payment_id for payment_id in payment_ids if payment_id})

    def one(payment_id: str) -> GatewayPayment | Exception:
        try:
            return gateway.fetch_payment(payment_id)
        except (GatewayTransient, GatewayPermanent, OutcomeUnknown) as exc:
            return exc

    if concurrency <= 1 or len(wanted) <= 1:
        return {payment_id: one(payment_id) for payment_id in wanted}
    return dict(zip(wanted, thread_pool(concurrency).map(one, wanted), strict=True))
