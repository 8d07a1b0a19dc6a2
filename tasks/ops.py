"""Operations tasks: `ops.check_schedules`, which pages when a scheduled job missed its window."""

from __future__ import annotations

from typing import Any

from config import get_settings
from config.schedule import current_slot, schedule_windows
from workers.base import TaskContext, task, utcnow
from workers.jobs import run_in_slot
from workers.ops import JOB, check_schedules


@task(JOB)
def check(ctx: TaskContext) -> dict[str, Any]:
    settings = get_settings()

    def work() -> dict[str, Any]:
        missed = check_schedules(ctx.session, ctx.now, schedule_windows(settings))
        return {"missed": len(missed), "jobs": missed}

    return run_in_slot(
        ctx.session,
        JOB,
        current_slot(JOB, settings, ctx.now),
        task_id=ctx.task_id,
        now=ctx.now,
        clock=utcnow,
        work=work,
    )
