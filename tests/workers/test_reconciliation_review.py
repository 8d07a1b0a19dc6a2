"""Reconciliation findings as people work through them (`workers/reconciliation/review.py`):
the recent runs with what waits, a run's findings filtered, acknowledge and resolve audited."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select

from workers.db import session_scope
from workers.models import ReconciliationDiscrepancy, ReconciliationRun, StateTransition
from workers.reconciliation import review

T0 = datetime(2026, 6, 2, tzinfo=UTC)


def add_run(
    gateway: str = "stripe", day: int = 0, findings: int = 3, fixed: int = 1
) -> tuple[int, list[int]]:
    """A completed run of one day, with findings: the first `fixed` corrected by the run."""
    start = T0 + timedelta(days=day)
    with session_scope() as session:
        run_id = session.execute(
            insert(ReconciliationRun)
            .values(
                gateway=gateway,
                window_start=start,
                window_end=start + timedelta(days=1),
                status="COMPLETED",
                started_at=start + timedelta(days=1, hours=2),
                finished_at=start + timedelta(days=1, hours=2, seconds=42),
                counts={"payments": 1000, "fixed": fixed, "flagged": findings - fixed},
                actor="reconciliation.nightly",
            )
            .returning(ReconciliationRun.id)
        ).scalar_one()
        ids = [
            session.execute(
                insert(ReconciliationDiscrepancy)
                .values(
                    run_id=run_id,
                    type="STATUS_MISMATCH" if n % 2 else "MISSING_IN_DB",
                    gateway_payment_id=f"pay_{run_id}_{n}",
                    details={"ours": "PENDING", "theirs": "captured"},
                    fixed=n < fixed,
                )
                .returning(ReconciliationDiscrepancy.id)
            ).scalar_one()
            for n in range(findings)
        ]
    return run_id, ids


def test_recent_runs_say_how_many_findings_wait_for_a_person(committed: Engine) -> None:
    older, _ = add_run(day=0)
    newer, ids = add_run(day=1, findings=4, fixed=0)
    with session_scope() as session:
        review.review(session, [ids[0]], "RESOLVED", actor="alice", reason="refunded", now=T0)
        runs = review.recent_runs(session)
    assert [(r["id"], r["waiting"], r["seconds"]) for r in runs] == [
        (newer, 3, 42.0),
        (older, 2, 42.0),
    ]
    with session_scope() as session:
        assert [r["id"] for r in review.recent_runs(session, before=newer)] == [older]
        assert review.recent_runs(session, gateway="razorpay") == []


def test_findings_filter_by_type_review_and_what_waits(committed: Engine) -> None:
    run_id, ids = add_run(findings=5, fixed=1)
    with session_scope() as session:
        review.review(session, [ids[1]], "ACKNOWLEDGED", actor="alice", reason="on it", now=T0)

    def found(**chosen: Any) -> list[int]:
        with session_scope() as session:
            return [
                row.id for row in review.findings(session, run_id, review.FindingFilters(**chosen))
            ]

    assert found() == ids
    assert found(type="STATUS_MISMATCH") == [ids[1], ids[3]]
    assert found(status="ACKNOWLEDGED") == [ids[1]]
    assert found(waiting=True) == ids[1:]


def test_acknowledge_then_resolve_is_audited_and_a_resolved_finding_stays_resolved(
    committed: Engine,
) -> None:
    _, ids = add_run()
    with session_scope() as session:
        with pytest.raises(ValueError, match="needs a reason"):
            review.review(session, ids[:1], "RESOLVED", actor="alice", reason=" ", now=T0)
        said = review.review(
            session, ids[:1], "ACKNOWLEDGED", actor="alice", reason="on it", now=T0
        )
        said += review.review(
            session, [ids[0], 999999], "RESOLVED", actor="bob", reason="fixed", now=T0
        )
        said += review.review(session, ids[:1], "ACKNOWLEDGED", actor="carol", reason="?", now=T0)
    assert [line for _, line in said] == [
        f"finding {ids[0]}: ACKNOWLEDGED",
        f"finding {ids[0]}: RESOLVED",
        "finding 999999 does not exist",
        f"finding {ids[0]} is RESOLVED: not ACKNOWLEDGED",
    ]
    with session_scope() as session:
        trail = [
            (row.from_status, row.to_status, row.actor, row.reason)
            for row in session.scalars(
                select(StateTransition)
                .where(StateTransition.entity == "reconciliation_discrepancies")
                .order_by(StateTransition.id)
            )
        ]
    assert trail == [
        ("OPEN", "ACKNOWLEDGED", "alice", "on it"),
        ("ACKNOWLEDGED", "RESOLVED", "bob", "fixed"),
    ]
