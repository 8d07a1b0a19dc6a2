"""`backstop jobs` on real Postgres and Redis: every beat job listed, one run now through its
slot claim, and a second run for the same slot refused in one line."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Engine

from tests.cli.test_dlq import run
from tests.workers.test_dlq import sent


def test_list_and_run_now(committed: Engine, redis: Any) -> None:
    listed = json.loads(run("jobs", "list", "--json").output)
    jobs = {job["task"]: job for job in listed}
    assert {"refunds.retry_stuck", "dlq.triage", "reconciliation.nightly"} <= jobs.keys()
    assert jobs["refunds.retry_stuck"]["every"] == "cron */30 * * * *"
    assert jobs["holds.sweep_expired"]["heartbeat"] is True
    done = run("jobs", "run", "ops.retention")
    assert done.exit_code == 0 and "ops.retention: sent as task" in done.output
    assert "as ops:carol" in done.output
    assert [name for name, _, _ in sent(redis)] == ["ops.retention"]
    again = run("jobs", "run", "ops.retention")
    assert again.exit_code == 1 and "has already run or is running" in again.output
    unknown = run("jobs", "run", "no.such")
    assert unknown.exit_code == 1 and "no.such is not a scheduled job" in unknown.output
    text = run("jobs", "list").output
    assert "ops.retention" in text and "ops:carol" in text
