"""Nightly retention on real Postgres: old rows go in batches, everything still needed stays."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, func, insert, select

from workers.db import Steps, new_session, session_scope
from workers.models import DeadLetter, DeadLetterEvent, JobRun, StateTransition, WebhookEvent
from workers.ops.retention import Retention, prune

NOW = datetime(2026, 6, 1, 3, 15, tzinfo=UTC)
POLICY = Retention(
    job_runs=timedelta(days=30),
    dead_letters=timedelta(days=90),
    webhook_events=timedelta(days=30),
    audit=timedelta(days=730),
    batch_size=7,
)


def days_ago(days: int) -> datetime:
    return NOW - timedelta(days=days)


def count(model: type) -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(model)))


def test_old_rows_go_in_batches_and_what_is_still_needed_stays(committed: Engine) -> None:
    with session_scope() as session:
        session.execute(
            insert(JobRun),
            [
                {"job_name": "dlq.triage", "started_at": days_ago(d), "outcome": "OK"}
                for d in (40,) * 20 + (1,) * 3
            ],
        )
        letters = [
            {
                "task_name": "holds.expire",
                "error_type": "E",
                "error_message": "m",
                "status": status,
                "created_at": days_ago(age),
                "updated_at": days_ago(age),
            }
            for status, age in [("REPLAYED", 100)] * 10
            + [("DISCARDED", 100)] * 5
            + [("MANUAL_REVIEW", 400), ("NEW", 400), ("REPLAYED", 10)]
        ]
        ids = list(session.scalars(insert(DeadLetter).returning(DeadLetter.id), letters))
        session.execute(
            insert(DeadLetterEvent),
            [
                {"dead_letter_id": i, "action": "replayed", "actor": "x", "at": days_ago(100)}
                for i in ids
            ],
        )
        session.execute(
            insert(WebhookEvent),
            [
                {
                    "provider": "stripe",
                    "event_id": f"evt_{n}",
                    "received_at": days_ago(age),
                    "processed_at": processed,
                }
                for n, (age, processed) in enumerate(
                    [(40, days_ago(40))] * 9 + [(40, None), (2, days_ago(2))]
                )
            ],
        )
        session.execute(
            insert(StateTransition),
            [
                {
                    "entity": "refunds",
                    "entity_id": 1,
                    "from_status": "PENDING",
                    "to_status": "PROCESSING",
                    "actor": "x",
                    "at": days_ago(age),
                }
                for age in [800] * 8 + [100]
            ],
        )
    session = new_session()
    try:
        deleted = prune(Steps(session), POLICY, NOW)
    finally:
        session.close()
    assert deleted == {
        "job_runs": 20,
        "dead_letters": 15,
        "webhook_events": 9,
        "state_transitions": 8,
    }
    assert count(JobRun) == 3
    with session_scope() as session:
        left = sorted(session.scalars(select(DeadLetter.status)))
    assert left == ["MANUAL_REVIEW", "NEW", "REPLAYED"]  # open ones stay whatever their age
    assert count(DeadLetterEvent) == 3  # the events went with their letters
    assert count(WebhookEvent) == 2  # the unprocessed one stays
    assert count(StateTransition) == 1
    again = new_session()
    try:
        assert set(prune(Steps(again), POLICY, NOW).values()) == {0}
    finally:
        again.close()
