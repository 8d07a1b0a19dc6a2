"""Refund tasks: `refunds.submit` (other services enqueue it once the refund row exists), the
30-minute retry job and the gateway re-checks it fans out."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from config import get_settings
from config.celery import max_countdown
from workers.base import TaskContext, task, utcnow
from workers.errors import RetryRemaining
from workers.gateways.registry import get_gateway
from workers.models import Refund
from workers.payloads import CheckRefund, CheckRefunds, SubmitRefund
from workers.refunds.checks import check_refunds, finish_checks
from workers.refunds.retries import RetryPolicy, retry_stuck_refunds
from workers.refunds.submission import submit_refund


def lease() -> timedelta:
    # Long enough for a lookup page and a submission, each up to the gateway timeout.
    return timedelta(seconds=4 * get_settings().GATEWAY_TIMEOUT_SECONDS + 5)


def refund_statuses(session: Session, ids: list[Any]) -> dict[int, tuple[str, bool]]:
    wanted = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
    rows = session.execute(
        select(Refund.id, Refund.status, Refund.requires_manual_review).where(Refund.id.in_(wanted))
    ).all()
    return {row.id: (row.status, row.requires_manual_review) for row in rows}


def refund_still_to_send(
    session: Session, payloads: list[dict[str, Any]], actor: str
) -> list[str | None]:
    """A replayed submission has nothing to do once the refund is COMPLETED; one in manual
    review is a person's to resolve."""
    found = refund_statuses(session, [p.get("refund_id") for p in payloads])
    answers: list[str | None] = []
    for payload in payloads:
        status, review = found.get(payload.get("refund_id"), (None, False))  # type: ignore[arg-type]
        if status == "COMPLETED":
            answers.append(f"refund {payload['refund_id']} is already COMPLETED")
        elif review:
            answers.append(f"refund {payload['refund_id']} is in manual review")
        else:
            answers.append(None)
    return answers


def refund_still_processing(
    session: Session, payloads: list[dict[str, Any]], actor: str
) -> list[str | None]:
    found = refund_statuses(session, [p.get("refund_id") for p in payloads])
    answers: list[str | None] = []
    for payload in payloads:
        status, _ = found.get(payload.get("refund_id"), (None, False))  # type: ignore[arg-type]
        if status is not None and status != "PROCESSING":
            answers.append(f"refund {payload['refund_id']} is already {status}")
        else:
            answers.append(None)
    return answers


def refunds_still_processing(
    session: Session, payloads: list[dict[str, Any]], actor: str
) -> list[str | None]:
    every = [i for p in payloads for i in (p.get("refund_ids") or [])]
    found = refund_statuses(session, every)
    answers: list[str | None] = []
    for payload in payloads:
        ids = payload.get("refund_ids") or []
        if ids and all(found.get(i, ("PROCESSING", False))[0] != "PROCESSING" for i in ids):
            answers.append(
                f"none of refunds {ids[:5]}{'...' if len(ids) > 5 else ''} is PROCESSING"
            )
        else:
            answers.append(None)
    return answers


@task("refunds.submit", payload=SubmitRefund, batch_precheck=refund_still_to_send)
def submit(ctx: TaskContext, payload: SubmitRefund) -> str:
    return submit_refund(ctx.steps, payload.refund_id, utcnow, get_gateway, lease=lease())


@task("refunds.check", payload=CheckRefund, batch_precheck=refund_still_processing)
def check(ctx: TaskContext, payload: CheckRefund) -> str:
    """One PROCESSING refund re-checked at its gateway (a replay from the dead-letter queue)."""
    checked = check_refunds(ctx.steps, [payload.refund_id], utcnow, get_gateway)
    return checked.outcome(payload.refund_id)


@task("refunds.check_many", payload=CheckRefunds, batch_precheck=refunds_still_processing)
def check_many(ctx: TaskContext, payload: CheckRefunds) -> dict[str, int]:
    """PROCESSING refunds re-checked at their gateways, many calls at a time. What got no
    answer is retried on its own with backoff; what the gateway's open breaker holds back is
    sent again once it may close; what cannot be asked about is dead-lettered refund by refund."""
    settings = get_settings()
    checked = check_refunds(
        ctx.steps,
        payload.refund_ids,
        utcnow,
        get_gateway,
        concurrency=settings.GATEWAY_CONCURRENCY,
        actor="refunds.check_many",
    )
    with ctx.step("answers") as session:  # they stay: only what got none is retried
        finish_checks(
            session,
            checked,
            task_id=ctx.task_id,
            now=utcnow(),
            max_countdown=max_countdown(settings),
        )
    if checked.retry:
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
def retry_stuck(ctx: TaskContext) -> dict[str, Any]:
    return ctx.in_slot(
        lambda: retry_stuck_refunds(ctx.steps, ctx.clock, retry_policy()).as_dict(),
    )
