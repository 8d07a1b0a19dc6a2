"""Schedule freshness: every scheduled job must finish a run within its window, or page."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from workers.jobs import hour_bucket, last_finished
from workers.models import JobRun
from workers.observability.alerts import raise_alert


def check_schedules(session: Session, now: datetime, windows: dict[str, timedelta]) -> list[str]:
    """Alert for every job whose last run finished longer ago than its window. A job that has
    never run is measured from the first schedule check ever recorded, so a new deployment
    is not paged before a job had its chance. Pages once an hour per missed job."""
    finished = last_finished(session)
    first_check = (
        session.scalar(
            select(func.min(JobRun.started_at)).where(JobRun.job_name == "ops.check_schedules")
        )
        or now
    )
    missed = []
    for job, window in sorted(windows.items()):
        last = finished.get(job)
        since = last or first_check
        if now - since <= window:
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
