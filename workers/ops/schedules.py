"""The schedules: freshness (every scheduled job must finish a run within its window, or
page), the jobs as operators see them, and an operator's run now through the slot claim."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from config import Settings
from config.schedule import (
    CHECK_SCHEDULES_EVERY,
    HEARTBEAT_JOBS,
    beat_schedule,
    current_slot,
    next_due,
    schedule_windows,
)
from workers.errors import PermanentError
from workers.jobs import claim_slot, first_seen, hour_bucket, last_finished, record_schedule
from workers.messaging.enqueue import enqueue_after_commit
from workers.models import JobRun
from workers.observability.alerts import raise_alert


def check_schedules(session: Session, now: datetime, windows: dict[str, timedelta]) -> list[str]:
    """Alert for every job whose last run finished longer ago than its window. A job that has
    never run is measured from when it was first seen in the schedule (recorded here, if no
    deployment did before), so neither a new deployment nor a job a release adds is paged
    before it had its chance. Pages once an hour per missed job."""
    record_schedule(session, windows, now)
    finished = last_finished(session)
    seen = first_seen(session)
    missed = []
    for job, window in sorted(windows.items()):
        last = finished.get(job)
        if now - (last or seen[job]) <= window:
            continue
        missed.append(job)
        raise_alert(
            session,
            "schedule_missed",
            f"{job} has not finished a run since {last.isoformat() if last else 'ever'} "
            f"(window {window})",
            dedupe=f"schedule-missed:{job}:{hour_bucket(now).isoformat()}",
            now=now,
            job=job,
            last_finished=last.isoformat() if last else "never",
        )
    return missed


# -- the schedules as operators see them ---------------------------------------------------------


@dataclass
class JobView:
    """One beat job as the console and `backstop jobs list` show it."""

    entry: str  # the beat entry's name
    task: str
    every: str  # the schedule in words: "every 15s", "cron */30 * * * *"
    heartbeat: bool  # runs every few seconds on one heartbeat row per hour: no slot
    window: timedelta
    last_started: datetime | None
    last_finished: datetime | None
    outcome: str | None
    counts: dict[str, Any]
    error: str | None
    requested_by: str | None
    runs_in_row: int  # runs on the last row (a heartbeat row adds up an hour's)
    next_due: datetime
    slot: datetime | None  # the current slot, and whether it has been taken
    slot_taken: bool
    missed: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            key: value.isoformat()
            if isinstance(value, datetime)
            else value.total_seconds()
            if isinstance(value, timedelta)
            else value
            for key, value in self.__dict__.items()
        }


def schedule_words(schedule: Any) -> str:
    if isinstance(schedule, timedelta):
        return f"every {int(schedule.total_seconds())}s"
    return (
        f"cron {schedule._orig_minute} {schedule._orig_hour} {schedule._orig_day_of_month} "
        f"{schedule._orig_month_of_year} {schedule._orig_day_of_week}"
    )


def jobs_overview(session: Session, settings: Settings, now: datetime) -> list[JobView]:
    """Every beat job: its schedule, its last run (outcome, counts, who asked), when it is
    next due, whether its current slot has run, and whether it missed its window."""
    windows = schedule_windows(settings)
    latest = {
        row.job_name: row
        for row in session.scalars(
            select(JobRun).where(
                JobRun.id.in_(select(func.max(JobRun.id)).group_by(JobRun.job_name))
            )
        )
    }
    finished = last_finished(session)
    seen = first_seen(session)
    views = []
    for name, entry in beat_schedule(settings).items():
        task = str(entry["task"])
        row = latest.get(task)
        heartbeat = task in HEARTBEAT_JOBS
        slot = None if heartbeat else current_slot(task, settings, now)
        taken = slot is not None and session.scalar(
            select(func.count()).where(JobRun.job_name == task, JobRun.bucket == slot)
        )
        window = windows.get(task, CHECK_SCHEDULES_EVERY * 2)
        last = finished.get(task)
        views.append(
            JobView(
                entry=name,
                task=task,
                every=schedule_words(entry["schedule"]),
                heartbeat=heartbeat,
                window=window,
                last_started=row.started_at if row else None,
                last_finished=last,
                outcome=row.outcome if row else None,
                counts=dict(row.counts) if row else {},
                error=row.error if row else None,
                requested_by=row.requested_by if row else None,
                runs_in_row=row.runs if row else 0,
                next_due=next_due(task, settings, now),
                slot=slot,
                slot_taken=bool(taken),
                missed=now - (last or seen.get(task, now)) > window,
            )
        )
    return views


class JobRefused(PermanentError):
    """A run now that cannot be: the message says why and when the job runs next."""


def run_now(session: Session, task: str, settings: Settings, now: datetime, actor: str) -> str:
    """Run a scheduled job now, through its slot claim: the current slot is claimed for a new
    task id with `actor` as who asked (`job_runs.requested_by`), and the task is sent with that
    id once the session commits, so it carries on with the slot. If the slot has already run,
    or is running, nothing is sent: a run now never repeats a slot's work. Returns the task id."""
    try:
        slot = current_slot(task, settings, now)
    except KeyError:
        raise JobRefused(f"{task} is not a scheduled job") from None
    if task in HEARTBEAT_JOBS:
        raise JobRefused(
            f"{task} runs every few seconds on its own, with no slot to run now; if it is not "
            "running, see to beat and the workers"
        )
    task_id = str(uuid.uuid4())
    if not claim_slot(session, task, slot, task_id=task_id, now=now, requested_by=actor):
        raise JobRefused(
            f"{task}: the current slot ({slot.isoformat()}) has already run or is running; "
            f"it is next due at {next_due(task, settings, now).isoformat()}"
        )
    enqueue_after_commit(session, task, {}, task_id=task_id)
    return task_id
