"""`job_runs`: the record of every scheduled job's runs, which schedule checks read, and
`scheduled_jobs`: since when each job has been expected to run."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from workers.db.upsert import insert_ignore
from workers.models import JobRun, ScheduledJob

log = logging.getLogger("backstop.jobs")


def hour_bucket(now: datetime) -> datetime:
    return now.replace(minute=0, second=0, microsecond=0)


def record_heartbeat(
    session: Session,
    job_name: str,
    *,
    started_at: datetime,
    finished_at: datetime,
    outcome: str,
    counts: dict[str, int],
    task_id: str | None = None,
    error: str | None = None,
) -> None:
    """Add one run of a job that runs every few seconds to its heartbeat row for this hour:
    `runs` counts the runs, `counts` adds up their counters, and `started_at`/`finished_at`
    are the last run's, which is what freshness checks read."""
    bucket = hour_bucket(started_at)
    values: dict[str, Any] = {
        "job_name": job_name,
        "bucket": bucket,
        "started_at": started_at,
        "finished_at": finished_at,
        "outcome": outcome,
        "runs": 1,
        "counts": counts,
        "task_id": task_id,
        "error": error,
    }
    inserted = insert_ignore(
        session,
        JobRun,
        values,
        conflict=["job_name", "bucket"],
        where=JobRun.bucket.isnot(None),
        returning=JobRun.id,
    )
    if inserted:
        return
    row = session.execute(
        select(JobRun.id, JobRun.runs, JobRun.counts)
        .where(JobRun.job_name == job_name, JobRun.bucket == bucket)
        .with_for_update()
    ).one()
    total = dict(row.counts)
    for key, value in counts.items():
        total[key] = int(total.get(key, 0)) + value
    session.execute(
        update(JobRun)
        .where(JobRun.id == row.id)
        .values(
            runs=row.runs + 1,
            counts=total,
            started_at=started_at,
            finished_at=finished_at,
            outcome=outcome,
            task_id=task_id,
            error=error,
        )
    )


def last_finished(session: Session) -> dict[str, datetime]:
    """When each job last finished a run, OK or not."""
    rows = session.execute(
        select(JobRun.job_name, func.max(JobRun.finished_at)).group_by(JobRun.job_name)
    ).all()
    return {name: finished for name, finished in rows if finished is not None}


def record_schedule(session: Session, job_names: Iterable[str], now: datetime) -> None:
    """Note each job of the schedule as seen at `now` unless it was seen before: the first
    time stays, across restarts and deployments."""
    rows = [{"job_name": name, "first_seen_at": now} for name in sorted(set(job_names))]
    if rows:
        insert_ignore(session, ScheduledJob, rows, conflict=["job_name"])


def first_seen(session: Session) -> dict[str, datetime]:
    """When each job was first seen in the schedule: a job that has never finished a run is
    measured from then."""
    rows = session.execute(select(ScheduledJob.job_name, ScheduledJob.first_seen_at)).all()
    return {name: seen for name, seen in rows}


def held_slot(session: Session, job_name: str, task_id: str | None) -> datetime | None:
    """The slot this task id has claimed and not finished, if any: an operator's run now
    claims the current slot before it sends the task, and a run redelivered after a crash
    holds its slot already. Either may start after the slot's boundary; it carries on with the
    slot it holds, not the one its clock falls in (which would leave the held one unfinished
    and its work undone)."""
    if task_id is None:
        return None
    return session.execute(
        select(JobRun.bucket)
        .where(
            JobRun.job_name == job_name,
            JobRun.task_id == task_id,
            JobRun.bucket.isnot(None),
            JobRun.finished_at.is_(None),
        )
        .order_by(JobRun.bucket.desc())
        .limit(1)
    ).scalar_one_or_none()


def claim_slot(
    session: Session,
    job_name: str,
    slot: datetime,
    *,
    task_id: str | None,
    now: datetime,
    requested_by: str | None = None,
) -> bool:
    """Take this job's run for one schedule slot: its `job_runs` row, keyed by (job, slot),
    written now and committed with the run's first commit. Whoever comes second for the same
    slot (a second beat, a manual run) finds it taken and does nothing; the same task coming
    back (a retry, a redelivery after a crash) carries on with its own slot. An operator's run
    now claims the slot first, for the task id it then sends (`workers/ops/schedules.py`)."""
    inserted = insert_ignore(
        session,
        JobRun,
        {
            "job_name": job_name,
            "bucket": slot,
            "started_at": now,
            "runs": 1,
            "counts": {},
            "task_id": task_id,
            "requested_by": requested_by,
        },
        conflict=["job_name", "bucket"],
        where=JobRun.bucket.isnot(None),
        returning=JobRun.id,
    )
    if inserted:
        return True
    holder = session.execute(
        select(JobRun.task_id, JobRun.finished_at).where(
            JobRun.job_name == job_name, JobRun.bucket == slot
        )
    ).one()
    return task_id is not None and holder.task_id == task_id and holder.finished_at is None


def finish_slot(
    session: Session,
    job_name: str,
    slot: datetime,
    *,
    finished_at: datetime,
    outcome: str,
    counts: dict[str, Any],
    error: str | None = None,
) -> None:
    session.execute(
        update(JobRun)
        .where(JobRun.job_name == job_name, JobRun.bucket == slot)
        .values(finished_at=finished_at, outcome=outcome, counts=counts, error=error)
    )


def run_in_slot(
    session: Session,
    job_name: str,
    slot: datetime,
    *,
    task_id: str | None,
    now: datetime,
    clock: Callable[[], datetime],
    work: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """Run a scheduled job's `work` once for its slot (see `claim_slot`), recording the run on
    the slot's row. A run whose slot is taken does nothing and says so."""
    if not claim_slot(session, job_name, slot, task_id=task_id, now=now):
        log.info("job.slot_taken", extra={"job": job_name, "slot": slot.isoformat()})
        return {"skipped": "slot already run", "slot": slot.isoformat()}
    counts = work()
    finish_slot(session, job_name, slot, finished_at=clock(), outcome="OK", counts=counts)
    return counts
