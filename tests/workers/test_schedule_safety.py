"""Schedule safety: two beats firing every job at the same moments over a simulated day (and a
manual run on top) do each job's work once per schedule slot, on real parallel connections."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import redis as redis_lib
from sqlalchemy import Engine, select, update

from config import get_settings
from config.schedule import current_slot
from tests.workers.factories import add_refund
from workers.application import registered_tasks
from workers.base import TaskContext
from workers.db import new_session
from workers.dead_letters import record_dead_letter
from workers.errors import Classification, TransientError
from workers.models import DeadLetter, JobRun, Refund

DAY = datetime(2026, 6, 1, tzinfo=UTC)
# Every scheduled job that claims its slot; the 5-second hold sweep and the notification outbox
# sweep instead claim their rows (SKIP LOCKED) and keep an hourly heartbeat row.
JOBS = (
    "refunds.retry_stuck",
    "dlq.triage",
    "ops.check_schedules",
    "ops.retention",
    "payments.check_in_flight",
    "reconciliation.nightly",
)


def run(job: str, now: datetime, task_id: str, results: list[dict[str, Any]]) -> None:
    """The scheduled task's own body, as a worker runs it, with the day's simulated clock."""
    session = new_session()
    try:
        ctx = TaskContext(session, now, task_id, job, 0, clock=lambda: now)
        results.append(registered_tasks()[job].body(ctx))
        session.commit()
    finally:
        session.close()


def test_two_beats_over_a_day_do_each_jobs_work_once_per_slot(
    committed: Engine, sim: Any, redis: redis_lib.Redis
) -> None:
    settings = get_settings()
    refunds = [add_refund(sim, "stripe") for _ in range(30)]
    session = new_session()
    session.execute(
        update(Refund)
        .where(Refund.id.in_(refunds))
        .values(status="PROCESSING", updated_at=DAY - timedelta(hours=2), created_at=DAY)
    )
    letters = [
        record_dead_letter(
            session,
            task_name="holds.expire",
            task_id=None,
            payload={"hold_id": 10**9 + i},
            error=TransientError("busy"),
            attempts=1,
            classification=Classification.TRANSIENT,
            now=DAY,
        )
        for i in range(40)
    ]
    session.commit()
    session.close()

    seen: dict[str, datetime] = {}
    outcomes: Counter[str] = Counter()
    checked = replayed = 0
    at = DAY
    while at < DAY + timedelta(days=1):
        for job in JOBS:
            slot = current_slot(job, settings, at)
            if seen.get(job) == slot:
                continue
            seen[job] = slot
            results: list[dict[str, Any]] = []
            # Both beats fire the job at once; at noon an operator also runs it by hand.
            runners = ["beat-a", "beat-b"] + (
                ["manual"] if at.hour == 12 and at.minute == 0 else []
            )
            threads = [
                threading.Thread(target=run, args=(job, at, f"{job}:{who}:{slot}", results))
                for who in runners
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert len(results) == len(runners)
            done = [r for r in results if "skipped" not in r]
            assert len(done) == 1, (job, slot, results)  # exactly one did the work
            outcomes[job] += 1
            checked += done[0].get("checked", 0)
            replayed += done[0].get("replayed", 0)
        at += timedelta(minutes=5)

    assert outcomes == {
        "refunds.retry_stuck": 48,
        "dlq.triage": 96,
        "ops.check_schedules": 288,
        # Daily jobs: the slot still current at midnight (yesterday's) and today's.
        "ops.retention": 2,
        "payments.check_in_flight": 288,
        "reconciliation.nightly": 2,
    }
    session = new_session()
    rows = session.execute(select(JobRun.job_name, JobRun.bucket, JobRun.outcome)).all()
    per_slot = Counter((name, bucket) for name, bucket, _ in rows)
    assert set(per_slot.values()) == {1} and len(rows) == sum(outcomes.values())
    assert all(outcome == "OK" for _, _, outcome in rows)
    # The work itself, once per slot: every stuck refund re-checked once in each of the 48
    # retry slots (never by both beats), every dead letter replayed once by triage, which six
    # hours later (no worker reported back) gave up on the replays, once.
    assert checked == len(refunds) * 48
    assert replayed == len(letters)
    statuses = Counter(session.scalars(select(DeadLetter.status)))
    session.close()
    assert statuses == {"MANUAL_REVIEW": len(letters)}
