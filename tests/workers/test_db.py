"""Sessions, timeouts, lock helpers and the deadlock retry wrapper, on real Postgres."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from tests.conftest import utc
from tests.workers.factories import add_holds
from workers.db import (
    analyze_if_stale,
    on_commit,
    session_scope,
)
from workers.errors import Classification, classify
from workers.models import BookingHold

NOW = utc(2026, 1, 1)


def test_sessions_carry_the_postgres_timeouts() -> None:
    with session_scope() as session:
        values = {
            name: session.execute(text(f"SHOW {name}")).scalar()
            for name in ("lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout")
        }
    assert values == {
        "lock_timeout": "5s",
        "statement_timeout": "1min",
        "idle_in_transaction_session_timeout": "2min",
    }


def test_after_commit_callbacks_run_on_commit_only(committed: Engine) -> None:
    ran: list[str] = []
    with session_scope() as session:
        on_commit(session, lambda: ran.append("committed"))
        assert ran == []
    assert ran == ["committed"]
    with pytest.raises(RuntimeError), session_scope() as session:
        on_commit(session, lambda: ran.append("rolled back"))
        raise RuntimeError("boom")
    with session_scope():
        pass
    assert ran == ["committed"]


def test_a_failing_after_commit_callback_does_not_undo_the_commit(committed: Engine) -> None:
    def broker_down() -> None:
        raise ConnectionError("broker unreachable")

    with session_scope() as session:
        add_holds(session, [NOW])
        on_commit(session, broker_down)
    with session_scope() as session:
        assert session.scalar(select(BookingHold.id)) is not None


def test_error_sorting_of_real_database_errors(committed: Engine) -> None:
    with session_scope() as session:
        session.execute(text("SET LOCAL statement_timeout = '50ms'"))
        with pytest.raises(OperationalError) as timeout:
            session.execute(text("SELECT pg_sleep(1)"))
        assert classify(timeout.value) is Classification.TRANSIENT  # 57014
        session.rollback()
    with pytest.raises(DBAPIError) as bad_sql, session_scope() as session:
        session.execute(text("SELECT no_such_column FROM booking_holds"))
    assert classify(bad_sql.value) is Classification.PERMANENT  # 42703
    from sqlalchemy import create_engine

    unreachable = create_engine("postgresql+psycopg2://nobody@127.0.0.1:1/none")
    started = time.monotonic()
    with pytest.raises(OperationalError) as refused:
        unreachable.connect()
    assert time.monotonic() - started < 5
    assert classify(refused.value) is Classification.TRANSIENT


def _estimated_rows(engine: Engine, where: str) -> int:
    with engine.connect() as conn:
        plan = conn.execute(text(f"EXPLAIN (FORMAT JSON) SELECT id FROM dead_letters {where}"))
        return int(plan.scalar()[0]["Plan"]["Plan Rows"])


def test_a_table_a_batch_has_just_changed_is_analyzed_before_the_next_bulk_run(
    committed: Engine,
) -> None:
    with committed.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO dead_letters (task_name, error_type, error_message, status) "
                "SELECT 'holds.expire', 'E', 'm', 'NEW' FROM generate_series(1, 5000)"
            )
        )
    with committed.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE dead_letters"))
        # Autovacuum must not analyze it first (it would, within a minute).
        conn.execute(text("ALTER TABLE dead_letters SET (autovacuum_enabled = false)"))
    try:
        _analyze_before_the_next_bulk_run(committed)
    finally:
        with committed.begin() as conn:
            conn.execute(text("ALTER TABLE dead_letters RESET (autovacuum_enabled)"))


def _analyze_before_the_next_bulk_run(committed: Engine) -> None:
    # What triage leaves: every letter out of NEW, a moment before the operator's bulk replay.
    with committed.begin() as conn:
        conn.execute(text("UPDATE dead_letters SET status = 'MANUAL_REVIEW'"))
        conn.execute(text("SELECT pg_stat_force_next_flush()"))
    assert _estimated_rows(committed, "WHERE status = 'MANUAL_REVIEW'") < 10

    with Session(committed) as session:
        deadline = time.monotonic() + 10
        while not (analyzed := analyze_if_stale(session, "dead_letters")):
            session.rollback()  # a fresh snapshot of the statistics counters
            assert time.monotonic() < deadline, "the 5,000 changed rows never showed as stale"
            time.sleep(0.1)
        session.commit()
        assert analyzed
        assert _estimated_rows(committed, "WHERE status = 'MANUAL_REVIEW'") > 4000
        assert analyze_if_stale(session, "dead_letters") is False


def _stale_manual_review(committed: Engine, n: int) -> None:
    """n letters moved out of NEW in one statement after the last ANALYZE, as triage leaves
    them, with the change counted in the statistics (autovacuum kept off: the caller resets)."""
    with committed.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO dead_letters (task_name, payload, error_type, error_message, status) "
                "SELECT 'holds.expire', jsonb_build_object('hold_id', g), 'E', 'm', 'NEW' "
                "FROM generate_series(1, :n) g"
            ),
            {"n": n},
        )
    with committed.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE dead_letters"))
        conn.execute(text("ALTER TABLE dead_letters SET (autovacuum_enabled = false)"))
    with committed.begin() as conn:
        conn.execute(text("UPDATE dead_letters SET status = 'MANUAL_REVIEW'"))
        conn.execute(text("SELECT pg_stat_force_next_flush()"))
    deadline = time.monotonic() + 10
    changed = "SELECT n_mod_since_analyze FROM pg_stat_user_tables WHERE relname = 'dead_letters'"
    while True:
        with committed.connect() as conn:
            if int(conn.execute(text(changed)).scalar() or 0) >= n:
                return
        assert time.monotonic() < deadline, "the changed rows never showed in the statistics"
        time.sleep(0.1)


def test_a_bulk_replay_analyzes_first_and_a_dry_run_leaves_the_statistics_alone(
    committed: Engine, redis: Any
) -> None:
    from workers.base import utcnow
    from workers.db import DryRunSteps, Steps
    from workers.dlq.browse import Filters
    from workers.dlq.bulk import Selection, act_on_selection

    def replay_all(steps_class: type[Steps]) -> int:
        with Session(committed) as session:
            counts = act_on_selection(
                steps_class(session),
                Selection(Filters(statuses=("MANUAL_REVIEW",)), utcnow()),
                "replay",
                actor="ops",
                reason="test",
                now=utcnow(),
            )
            session.commit()
        return counts.replayed

    try:
        _stale_manual_review(committed, 5000)
        assert _estimated_rows(committed, "WHERE status = 'MANUAL_REVIEW'") < 10
        assert replay_all(DryRunSteps) == 5000
        # The dry run did not analyze (its ANALYZE would be rolled back, and yet reset the
        # change counter the real run then goes by).
        assert _estimated_rows(committed, "WHERE status = 'MANUAL_REVIEW'") < 10
        assert replay_all(Steps) == 5000
        # Analyzed before the batches moved the letters on: the statistics saw all of them in
        # manual review.
        assert _estimated_rows(committed, "WHERE status = 'MANUAL_REVIEW'") > 4000
    finally:
        with committed.begin() as conn:
            conn.execute(text("ALTER TABLE dead_letters RESET (autovacuum_enabled)"))
