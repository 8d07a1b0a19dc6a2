"""Refund tasks: `refunds.submit` (other services enqueue it once the refund row exists), the
30-minute retry job and the gateway re-checks it fans out."""

from __future__ import annotations

from datetime import timedelta

from config import get_settings
from config.celery import max_countdown
from workers.base import TaskContext, task, utcnow
from workers.errors import RetryRemaining
from workers.gateways.registry import get_gateway
from workers.jobs import record_run
from workers.payloads import CheckRefunds, SubmitRefund
from workers.refunds import (
    RetryPolicy,
    check_refunds,
    finish_checks,
    retry_stuck_refunds,
    submit_refund,
)


def lease() -> timedelta:
    # Long enough for a lookup page and a submission, each up to the gateway timeout.
    return timedelta(seconds=4 * get_settings().GATEWAY_TIMEOUT_SECONDS + 5)


@task("refunds.submit", payload=SubmitRefund)
def submit(ctx: TaskContext, payload: SubmitRefund) -> str:
    return submit_refund(ctx.session, payload.refund_id, utcnow, get_gateway, lease=lease())


@task("refunds.check", payload=SubmitRefund)
def check(ctx: TaskContext, payload: SubmitRefund) -> str:
    """One PROCESSING refund re-checked at its gateway (a replay from the dead-letter queue)."""
    checked = check_refunds(ctx.session, [payload.refund_id], utcnow, get_gateway)
    return checked.outcome(payload.refund_id)


@task("refunds.check_many", payload=CheckRefunds)
def check_many(ctx: TaskContext, payload: CheckRefunds) -> dict[str, int]:
    """PROCESSING refunds re-checked at their gateways, many calls at a time. What got no
    answer is retried on its own with backoff; what the gateway's open breaker holds back is
    sent again once it may close; what cannot be asked about is dead-lettered refund by refund."""
    settings = get_settings()
    checked = check_refunds(
        ctx.session,
        payload.refund_ids,
        utcnow,
        get_gateway,
        concurrency=settings.GATEWAY_CONCURRENCY,
        actor="refunds.check_many",
    )
    finish_checks(
        ctx.session,
        checked,
        task_id=ctx.task_id,
        now=utcnow(),
        max_countdown=max_countdown(settings),
    )
    if checked.retry:
        ctx.session.commit()  # the answers received stay; only the rest is retried
        first = next(iter(checked.retry.values()))
        raise RetryRemaining(
            f"{len(checked.retry)} of {len(payload.refund_ids)} refunds got no answer "
            f"(first: {first})",
            {"refund_ids": sorted(checked.retry)},
        )
    return checked.counts()


def retry_policy() -> RetryPolicy:
    settings = get_settings()
    return RetryPolicy(
        stuck_after=timedelta(seconds=settings.REFUND_STUCK_AFTER_SECONDS),
        pending_after=timedelta(seconds=settings.REFUND_PENDING_AFTER_SECONDS),
        escalate_after=timedelta(seconds=settings.REFUND_ESCALATE_AFTER_SECONDS),
        max_attempts=settings.REFUND_MAX_ATTEMPTS,
        check_chunk=settings.REFUND_CHECK_CHUNK,
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
