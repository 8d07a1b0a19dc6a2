"""Notification tasks: `notifications.send` (other services enqueue it), the delivery it sends
after commit, and the outbox sweep that re-sends deliveries the broker lost."""

from __future__ import annotations

from datetime import timedelta

from config import get_settings
from workers.base import TaskContext, task, utcnow
from workers.jobs import record_heartbeat
from workers.notify.channels import get_channels
from workers.notify.delivery import (
    DELIVER_TASK,
    deliver_notification,
    policy_from,
    send_notification,
    sweep_outbox,
)
from workers.payloads import DeliverNotification, SendNotification

SWEEP_JOB = "notifications.sweep_outbox"


@task("notifications.send", payload=SendNotification)
def send(ctx: TaskContext, payload: SendNotification) -> int:
    return send_notification(ctx.session, payload, ctx.now)


@task(DELIVER_TASK, payload=DeliverNotification)
def deliver(ctx: TaskContext, payload: DeliverNotification) -> str:
    outcome = deliver_notification(
        ctx.session,
        payload.notification_id,
        utcnow,
        get_channels(),
        policy_from(get_settings()),
        task_id=ctx.task_id,
    )
    return outcome.result


@task(SWEEP_JOB)
def sweep(ctx: TaskContext) -> dict[str, int]:
    settings = get_settings()
    result = sweep_outbox(
        ctx.session,
        utcnow,
        after=timedelta(seconds=settings.NOTIFY_OUTBOX_AFTER_SECONDS),
        time_budget=max(settings.NOTIFY_OUTBOX_SWEEP_SECONDS / 2, 5),
    )
    counts = {"enqueued": result.enqueued, "batches": result.batches}
    record_heartbeat(
        ctx.session,
        SWEEP_JOB,
        started_at=ctx.now,
        finished_at=utcnow(),
        outcome="OK",
        counts=counts,
        task_id=ctx.task_id,
    )
    return counts
