"""Operations tasks: `ops.check_schedules`, which pages when a scheduled job missed its window,
and `ops.retention`, the nightly prune of old rows."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from config import get_settings
from config.schedule import schedule_windows
from workers.base import TaskContext, task
from workers.ops.retention import Retention, prune
from workers.ops.schedules import check_schedules


@task("ops.check_schedules")
def check(ctx: TaskContext) -> dict[str, Any]:
    settings = get_settings()

    def work() -> dict[str, Any]:
        missed = check_schedules(ctx.session, ctx.now, schedule_windows(settings))
        return {"missed": len(missed), "jobs": missed}

    return ctx.in_slot(work)


def retention_policy() -> Retention:
    settings = get_settings()
    return Retention(
        job_runs=timedelta(days=settings.RETENTION_JOB_RUNS_DAYS),
        dead_letters=timedelta(days=settings.RETENTION_DEAD_LETTERS_DAYS),
        webhook_events=timedelta(days=settings.RETENTION_WEBHOOK_EVENTS_DAYS),
        audit=timedelta(days=settings.RETENTION_AUDIT_DAYS),
    )


@task("ops.retention")
def retention(ctx: TaskContext) -> dict[str, Any]:
    return ctx.in_slot(lambda: prune(ctx.steps, retention_policy(), ctx.now))
