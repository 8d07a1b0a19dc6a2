"""Operations tasks: `ops.check_schedules`, which pages when a scheduled job missed its window."""

from __future__ import annotations

from config import get_settings
from config.schedule import schedule_windows
from workers.base import TaskContext, task, utcnow
from workers.jobs import record_run
from workers.ops import JOB, check_schedules


@task(JOB)
def check(ctx: TaskContext) -> list[str]:
    missed = check_schedules(ctx.session, ctx.now, schedule_windows(get_settings()))
    record_run(
        ctx.session,
        JOB,
        started_at=ctx.now,
        finished_at=utcnow(),
        outcome="OK",
        counts={"missed": len(missed)},
        task_id=ctx.task_id,
    )
    return missed
