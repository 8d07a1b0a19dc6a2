"""`backstop health`: each check, the overall verdict and its exit code, and no secrets shown."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from config.schedule import beat_schedule, schedule_windows
from config.settings import load_settings
from tests.conftest import service_env
from tests.processes import ROOT
from workers.db import session_scope
from workers.jobs import first_seen, record_schedule, run_in_slot

HOURS_2 = timedelta(hours=2)


def health(**env: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "health", "--json"],
        env=service_env(**env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, json.loads(done.stdout)


def statuses(report: dict) -> dict[str, str]:  # type: ignore[type-arg]
    return {check["name"]: check["status"] for check in report["checks"]}


def test_healthy_when_every_job_ran_and_nothing_is_dead_lettered(committed: Engine) -> None:
    now = datetime.now(UTC)
    with session_scope() as session:
        for job in schedule_windows(load_settings()):  # every scheduled job, as they are added
            run_in_slot(session, job, now, task_id=None, now=now, clock=lambda: now, work=dict)
    code, report = health(RAZORPAY_KEY_ID="rzp_test_x", RAZORPAY_KEY_SECRET="s3cr3t-value")
    assert (code, report["status"]) == (0, "ok"), report
    assert statuses(report)["gateway razorpay"] == "ok"
    assert "s3cr3t-value" not in json.dumps(report)


def checks(report: dict) -> dict[str, dict[str, str]]:  # type: ignore[type-arg]
    return {check["name"]: check for check in report["checks"]}


def backstop(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env=service_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_fresh_deployment_waits_for_each_jobs_first_run(committed: Engine) -> None:
    assert backstop("db", "upgrade").returncode == 0  # what every deployment runs first
    code, report = health()
    assert (code, report["status"]) == (0, "ok"), report
    for job in schedule_windows(load_settings()):
        check = checks(report)[f"schedule {job}"]
        assert check["status"] == "ok", check
        assert check["detail"].startswith("waiting for first run"), check
    table = backstop("health").stdout
    assert re.search(r"schedule refunds\.retry_stuck +ok +waiting for first run", table), table


def test_a_job_past_its_first_window_without_a_run_is_degraded(committed: Engine) -> None:
    with session_scope() as session:  # deployed two hours ago; nothing has run since
        record_schedule(session, schedule_windows(load_settings()), datetime.now(UTC) - HOURS_2)
    code, report = health()
    assert (code, report["status"]) == (1, "degraded")
    retry = checks(report)["schedule refunds.retry_stuck"]  # window: 40 minutes
    assert retry["status"] == "degraded" and "never finished a run" in retry["detail"], retry
    nightly = checks(report)["schedule reconciliation.nightly"]  # window: a day and an hour
    assert nightly["status"] == "ok" and nightly["detail"].startswith("waiting for first run")


def test_a_job_nothing_recorded_as_scheduled_is_degraded_with_what_to_do(
    committed: Engine,
) -> None:
    """Migrated by plain `alembic upgrade` and beat never started: nothing says since when to
    expect the jobs, and nothing will run them. Not "waiting" for ever: degraded, and how."""
    code, report = health()  # the schema is there; scheduled_jobs is empty
    assert (code, report["status"]) == (1, "degraded"), report
    retry = checks(report)["schedule refunds.retry_stuck"]
    assert retry["status"] == "degraded", retry
    assert "backstop db upgrade" in retry["detail"] and "beat" in retry["detail"], retry


def test_db_upgrade_records_each_job_when_first_scheduled_and_keeps_that_time(
    committed: Engine,
) -> None:
    earlier = datetime.now(UTC) - HOURS_2
    with session_scope() as session:  # an earlier deployment scheduled only this job
        record_schedule(session, ["refunds.retry_stuck"], earlier)
    assert backstop("db", "upgrade").returncode == 0
    with session_scope() as session:
        seen = first_seen(session)
    settings = load_settings()
    assert set(seen) == {str(entry["task"]) for entry in beat_schedule(settings).values()}
    assert seen.pop("refunds.retry_stuck") == earlier
    assert all(datetime.now(UTC) - at < timedelta(minutes=1) for at in seen.values()), seen


def test_unhealthy_when_the_broker_is_down_and_credentials_are_never_shown(
    committed: Engine,
) -> None:
    code, report = health(
        BROKER_URL="redis://:brokerpw@127.0.0.1:1/0",
        RAZORPAY_KEY_ID="rzp_test_x",
        RAZORPAY_KEY_SECRET="s3cr3t-value",
    )
    assert (code, report["status"]) == (2, "unhealthy")
    assert statuses(report)["broker"] == "unhealthy"
    assert statuses(report)["gateway stripe"] == "ok"  # not configured, whatever Redis does
    text = json.dumps(report)
    assert "brokerpw" not in text and "s3cr3t-value" not in text


def test_unhealthy_when_the_database_is_down(committed: Engine) -> None:
    code, report = health(DATABASE_URL="postgresql+psycopg2://u:dbpw@127.0.0.1:1/none")
    assert (code, statuses(report)["database"]) == (2, "unhealthy")
    assert "dbpw" not in json.dumps(report)
