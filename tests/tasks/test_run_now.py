"""An operator's run now goes through the slot claim: with a real worker, the job runs once for
its slot, audited with who asked, and beat's own run of that slot then does nothing; a second
run now for the same slot is refused with nothing sent."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select

from config.schedule import current_slot
from config.settings import load_settings
from tests.conftest import wait_until
from tests.processes import Proc
from workers.base import utcnow
from workers.db import session_scope
from workers.jobs import claim_slot
from workers.messaging.enqueue import send
from workers.models import JobRun
from workers.ops.schedules import JobRefused, jobs_overview, run_now

pytestmark = pytest.mark.e2e


def slot_rows(job: str) -> list[Any]:
    with session_scope() as session:
        rows = list(session.scalars(select(JobRun).where(JobRun.job_name == job)))
        for row in rows:
            session.expunge(row)
        return rows


def test_run_now_takes_the_slot_once_and_beat_then_skips_it(
    committed: Engine, redis: Any, start_worker: Callable[..., Proc]
) -> None:
    worker = start_worker()
    settings = load_settings()
    with session_scope() as session:
        task_id = run_now(session, "dlq.triage", settings, utcnow(), "alice")
    wait_until(lambda: [r.outcome for r in slot_rows("dlq.triage")] == ["OK"], timeout=30)
    [row] = slot_rows("dlq.triage")
    assert (row.task_id, row.requested_by, row.runs) == (task_id, "alice", 1)

    with session_scope() as session, pytest.raises(JobRefused) as refused:
        run_now(session, "dlq.triage", settings, utcnow(), "bob")
    assert "has already run or is running; it is next due at" in str(refused.value)

    send("dlq.triage", {})  # what beat sends for the same slot
    wait_until(lambda: "job.slot_taken" in worker.output(), timeout=30)
    assert [(r.task_id, r.requested_by) for r in slot_rows("dlq.triage")] == [(task_id, "alice")]

    with session_scope() as session:
        views = {view.task: view for view in jobs_overview(session, settings, utcnow())}
    triage = views["dlq.triage"]
    assert (triage.outcome, triage.requested_by, triage.slot_taken) == ("OK", "alice", True)
    assert triage.next_due > utcnow() and not triage.missed
    assert views["holds.sweep_expired"].heartbeat
    with session_scope() as session, pytest.raises(JobRefused, match="runs every few seconds"):
        run_now(session, "holds.sweep_expired", settings, utcnow(), "alice")
    with session_scope() as session, pytest.raises(JobRefused, match="not a scheduled job"):
        run_now(session, "refunds.submit", settings, utcnow(), "alice")


def test_a_run_now_that_starts_after_its_slot_ended_finishes_the_slot_it_claimed(
    committed: Engine, redis: Any, start_worker: Callable[..., Proc]
) -> None:
    """The console claims the current slot and sends the task; the task may start after the
    slot's boundary (a busy queue). It must run the slot it holds, not start the next one and
    leave the claimed run unfinished, its work undone."""
    start_worker()
    settings = load_settings()
    now = utcnow()
    earlier = current_slot("dlq.triage", settings, now) - timedelta(minutes=15)
    task_id = "run-now-claimed-before-the-boundary"
    with session_scope() as session:  # what run_now did, 15 minutes ago
        assert claim_slot(
            session, "dlq.triage", earlier, task_id=task_id, now=now, requested_by="alice"
        )
    send("dlq.triage", {}, task_id=task_id)
    wait_until(lambda: [r.outcome for r in slot_rows("dlq.triage")] == ["OK"], timeout=30)
    [row] = slot_rows("dlq.triage")
    assert (row.bucket, row.task_id, row.requested_by) == (earlier, task_id, "alice")
