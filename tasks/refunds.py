"""Refund tasks: `refunds.submit` (other services enqueue it once the refund row exists), the
30-minute retry job and the per-refund gateway re-check it fans out."""

from __future__ import annotations

from datetime import timedelta

from config import get_settings
from workers.base import TaskContext, task, utcnow
from workers.gateways.registry import get_gateway
from workers.jobs import record_run
from workers.payloads import SubmitRefund
from workers.refunds import RetryPolicy, check_refund, retry_stuck_refunds, submit_refund


def lease() -> timedelta:
    # Long enough for a lookup page and a submission, each up to the gateway timeout.
    return timedelta(seconds=4 * get_settings().GATEWAY_TIMEOUT_SECONDS + 5)


@task("refunds.submit", payload=SubmitRefund)
def submit(ctx: TaskContext, payload: SubmitRefund) -> str:
    return submit_refund(ctx.session, payload.refund_id, utcnow, get_gateway, lease=lease())


@task("refunds.check", payload=SubmitRefund)
def check(ctx: TaskContext, payload: SubmitRefund) -> str:
    return check_refund(ctx.session, payload.refund_id, ctx.now, get_gateway)


def retry_policy() -> RetryPolicy:
    settings = get_settings()
    return RetryPolicy(
        stuck_after=timedelta(seconds=settings.REFUND_STUCK_AFTER_SECONDS),
        pending_after=timedelta(seconds=settings.REFUND_PENDING_AFTER_SECONDS),
        escalate_after=timedelta(seconds=settings.REFUND_ESCALATE_AFTER_SECONDS),
        max_attempts=settings.REFUND_MAX_ATTEMPTS,
    )


@task("refunds.retry_stuck")
def retry_stuck(ctx: TaskContext) -> dict[str, int]:
    counts = retry_stuck_refunds(ctx.session, utcnow, retry_policy()).as_dict()
    record_run(
        ctx.session,
        "refunds.retry_stuck",
        started_at=ctx.now,
        finished_at=utcnow(),
        outcome="OK",
        counts=counts,
        task_id=ctx.task_id,
    )
    return counts
