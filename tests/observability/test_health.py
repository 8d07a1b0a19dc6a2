"""`backstop health`: each check, the overall verdict and its exit code, and no secrets shown."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime

from sqlalchemy import Engine

from config.schedule import schedule_windows
from config.settings import load_settings
from tests.conftest import service_env
from tests.processes import ROOT
from workers.db import session_scope
from workers.jobs import run_in_slot


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


def test_degraded_when_a_schedule_never_ran(committed: Engine) -> None:
    code, report = health()
    assert (code, report["status"]) == (1, "degraded")
    assert statuses(report)["schedule refunds.retry_stuck"] == "degraded"


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
