"""Notification tasks: `notifications.send` (other services enqueue it), the delivery pump it
asks for after commit, single deliveries (retries, replays), and the outbox sweep that re-sends
deliveries the broker lost."""

from __future__ import annotations

from datetime import timedelta

from config import get_settings
from workers.base import TaskContext, task, utcnow
from workers.messaging.outbox import kick, pump_started
from workers.notify.channels import get_channels
from workers.notify.delivery import (
    deliver_due,
    deliver_notification,
    policy_from,
    replay_deliveries,
    replay_sends,
    send_notification,
    send_notifications,
    sweep_outbox,
)
from workers.payloads import DeliverNotification, SendNotification


def send_many(ctx: TaskContext, payloads: list[SendNotification]) -> list[int]:
    return send_notifications(ctx.session, payloads, ctx.now)


@task(
    "notifications.send",
    payload=SendNotification,
    batch_precheck=replay_sends,
    batch=send_many,  # type: ignore[arg-type]
)
def send(ctx: TaskContext, payload: SendNotification) -> int:
    return send_notification(ctx.session, payload, ctx.now)


@task("notifications.deliver", payload=DeliverNotification, batch_precheck=replay_deliveries)
def deliver(ctx: TaskContext, payload: DeliverNotification) -> str:
    outcome = deliver_notification(
        ctx.steps,
        payload.notification_id,
        utcnow,
        get_channels(),
        policy_from(get_settings()),
        task_id=ctx.task_id,
    )
    return outcome.result


@task("notifications.deliver_due")
def pump(ctx: TaskContext) -> dict[str, int]:
    """Every due notification, in batches; sent after each commit that writes notifications."""
    pump_started()
    result = deliver_due(
        ctx.steps,
        utcnow,
        get_channels(),
        policy_from(get_settings()),
        task_id=ctx.task_id,
        helper=kick,
    )
    if result.more:  # out of time with more due: hand over, so other tasks get a turn
        ctx.enqueue("notifications.deliver_due", {})
    return result.as_dict()


@task("notifications.sweep_outbox")
def sweep(ctx: TaskContext) -> dict[str, int]:
    settings = get_settings()
    result = sweep_outbox(
        ctx.steps,
        utcnow,
        after=timedelta(seconds=settings.NOTIFY_OUTBOX_AFTER_SECONDS),
        time_budget=max(settings.NOTIFY_OUTBOX_SWEEP_SECONDS / 2, 5),
    )
    counts = {"enqueued": result.enqueued, "batches": result.batches}
    ctx.heartbeat(counts)
    return counts
