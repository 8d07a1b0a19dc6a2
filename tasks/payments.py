"""The in-flight payment janitor, `payments.check_in_flight`, every PAYMENT_JANITOR_SECONDS on
the `default` queue (not `batch`, where a long reconciliation would hold it up)."""

from __future__ import annotations

from datetime import timedelta

from config import get_settings
from workers.base import TaskContext, task, utcnow
from workers.gateways.registry import get_gateway
from workers.janitor import JanitorPolicy, check_in_flight
from workers.jobs import record_run

JANITOR = "payments.check_in_flight"


def janitor_policy() -> JanitorPolicy:
    settings = get_settings()
    return JanitorPolicy(
        stuck_after=timedelta(seconds=settings.PAYMENT_STUCK_AFTER_SECONDS),
        max_attempts=settings.PAYMENT_CHECK_MAX_ATTEMPTS,
        concurrency=settings.GATEWAY_CONCURRENCY,
    )


@task(JANITOR)
def check(ctx: TaskContext) -> dict[str, int]:
    settings = get_settings()
    counts = dict(
        check_in_flight(
            ctx.session,
            utcnow,
            get_gateway,
            janitor_policy(),
            time_budget=max(settings.PAYMENT_JANITOR_SECONDS / 2, 10),
        )
    )
    record_run(
        ctx.session,
        JANITOR,
        started_at=ctx.now,
        finished_at=utcnow(),
        outcome="OK",
        counts=counts,
        task_id=ctx.task_id,
    )
    return counts
