"""Schedule freshness: a job that missed its window pages, once an hour, naming the job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, select

from workers.db import session_scope
from workers.jobs import run_in_slot
from workers.models import Notification
from workers.ops.schedules import check_schedules

T0 = datetime(2026, 7, 1, 10, tzinfo=UTC)
WINDOWS = {
    "refunds.retry_stuck": timedelta(minutes=40),
    "holds.sweep_expired": timedelta(seconds=60),
}


def alerts() -> list[Notification]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(Notification)
                .where(Notification.template == "alert.schedule_missed")
                .order_by(Notification.id)
            )
        )


def run(job: str, at: datetime) -> None:
    with session_scope() as session:
        run_in_slot(session, job, at, task_id=None, now=at, clock=lambda: at, work=dict)


def check(at: datetime) -> list[str]:
    with session_scope() as session:
        missed = check_schedules(session, at, WINDOWS)
        run_in_slot(
            session, "ops.check_schedules", at, task_id=None, now=at, clock=lambda: at, work=dict
        )
    return missed


def test_refund_retry_not_run_for_40_minutes_pages(committed: Engine) -> None:
    run("refunds.retry_stuck", T0)
    run("holds.sweep_expired", T0 + timedelta(minutes=41))
    assert check(T0 + timedelta(minutes=39)) == []
    assert check(T0 + timedelta(minutes=41)) == ["refunds.retry_stuck"]
    (alert,) = alerts()
    assert alert.data["job"] == "refunds.retry_stuck" and "window 0:40:00" in alert.data["message"]


def test_a_missed_job_pages_once_an_hour_while_it_stays_missed(committed: Engine) -> None:
    run("refunds.retry_stuck", T0)
    run("holds.sweep_expired", T0)
    for minutes in range(45, 60, 5):  # every 5 minutes, as beat runs the check
        check(T0.replace(minute=0) + timedelta(minutes=minutes))
    assert len(alerts()) == 2  # both jobs, once each in this hour
    check(T0 + timedelta(hours=1, minutes=5))
    assert len(alerts()) == 4


def test_a_new_deployment_is_not_paged_before_its_jobs_had_their_chance(
    committed: Engine,
) -> None:
    assert check(T0) == []  # no job has ever run, but the checker just started
    assert check(T0 + timedelta(minutes=30)) == ["holds.sweep_expired"]
    assert check(T0 + timedelta(minutes=41)) == ["holds.sweep_expired", "refunds.retry_stuck"]


def test_a_job_added_to_a_running_deployment_gets_its_own_first_window(
    committed: Engine,
) -> None:
    run("refunds.retry_stuck", T0)
    assert check(T0) == []
    later = T0 + timedelta(hours=2)  # a release adds a job with a 16-minute window
    run("refunds.retry_stuck", later)
    windows = {"refunds.retry_stuck": WINDOWS["refunds.retry_stuck"]}
    windows["payments.check_in_flight"] = timedelta(minutes=16)
    for minutes, missed in ((0, []), (15, []), (17, ["payments.check_in_flight"])):
        with session_scope() as session:
            assert check_schedules(session, later + timedelta(minutes=minutes), windows) == missed
