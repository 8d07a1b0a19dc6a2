"""Hold expiry tasks: `holds.expire` (enqueued by other services), the sweep, the follow-up."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from config import get_settings
from config.celery import max_countdown
from workers.base import TaskContext, task, utcnow
from workers.holds.expiry import expire_hold, notify_expired, sweep_expired_holds
from workers.models import BookingHold
from workers.payloads import ExpireHold, HoldsExpired

log = logging.getLogger("backstop.holds")


def hold_still_open(
    session: Session, payloads: list[dict[str, Any]], actor: str
) -> list[str | None]:
    """A replayed expiry has nothing to do once the hold is final or gone."""
    ids = [payload.get("hold_id") for payload in payloads]
    statuses = dict(
        session.execute(
            select(BookingHold.id, BookingHold.status).where(
                BookingHold.id.in_([i for i in ids if isinstance(i, int)])
            )
        ).all()
    )
    answers: list[str | None] = []
    for hold_id in ids:
        status = statuses.get(hold_id)  # type: ignore[arg-type]
        if status is None:
            answers.append(None)  # let the task say what is wrong with the payload
        elif status != "ACTIVE":
            answers.append(f"hold {hold_id} is already {status}")
        else:
            answers.append(None)
    return answers


@task("holds.expire", payload=ExpireHold, batch_precheck=hold_still_open)
def expire(ctx: TaskContext, payload: ExpireHold) -> str:
    outcome = expire_hold(ctx.session, payload.hold_id, ctx.now)
    if outcome.result == "not_due":
        # Called early: come back when it is due. Long waits go in steps below the broker's
        # visibility timeout; the sweep expires the hold on time whatever happens to us.
        wait = (outcome.expires_at - ctx.now).total_seconds()
        ctx.enqueue(
            "holds.expire",
            {"hold_id": payload.hold_id},
            countdown=min(max(wait, 0.0), max_countdown(get_settings())),
        )
    log.info("hold.%s", outcome.result, extra={"hold_id": payload.hold_id})
    return outcome.result


@task("holds.sweep_expired")
def sweep(ctx: TaskContext) -> dict[str, int]:
    settings = get_settings()
    result = sweep_expired_holds(
        ctx.steps,
        utcnow,
        batch_size=settings.HOLD_SWEEP_BATCH,
        time_budget=max(settings.HOLD_SWEEP_SECONDS * 6, 30),
    )
    counts = {"expired": result.expired, "batches": result.batches}
    ctx.heartbeat(counts)
    if result.expired:
        log.info("holds.swept", extra=counts)
    return counts


@task("holds.expired", payload=HoldsExpired)
def expired(ctx: TaskContext, payload: HoldsExpired) -> int:
    return notify_expired(ctx.session, list(payload.hold_ids), ctx.now)
