"""The in-flight payment janitor, `payments.check_in_flight`, every PAYMENT_JANITOR_SECONDS on
the `default` queue (not `batch`, where a long reconciliation would hold it up)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from config import get_settings
from workers.base import TaskContext, task
from workers.gateways.registry import get_gateway
from workers.payments.in_flight import JanitorPolicy, check_in_flight


def janitor_policy() -> JanitorPolicy:
    settings = get_settings()
    return JanitorPolicy(
        stuck_after=timedelta(seconds=settings.PAYMENT_STUCK_AFTER_SECONDS),
        max_attempts=settings.PAYMENT_CHECK_MAX_ATTEMPTS,
        concurrency=settings.GATEWAY_CONCURRENCY,
    )


@task("payments.check_in_flight")
def check(ctx: TaskContext) -> dict[str, Any]:
    settings = get_settings()
    return ctx.in_slot(
        lambda: dict(
            check_in_flight(
                ctx.steps,
                ctx.clock,
                get_gateway,
                janitor_policy(),
                time_budget=max(settings.PAYMENT_JANITOR_SECONDS / 2, 10),
            )
        ),
    )
