"""Sessions, timeouts, lock helpers and the deadlock retry wrapper, on real Postgres."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import Engine, select, text, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from tests.conftest import utc
from tests.workers.factories import add_holds
from workers.db import (
    get_engine,
    lock_rows,
    new_session,
    on_commit,
    run_in_transaction,
    session_scope,
    try_advisory_xact_lock,
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


def test_lock_rows_locks_in_id_order(committed: Engine) -> None:
    with session_scope() as session:
        ids = add_holds(session, [NOW] * 5)
    with session_scope() as session:
        rows = lock_rows(session, BookingHold, reversed(ids))
        assert [row.id for row in rows] == ids
        # A second connection cannot take any of them while we hold them.
        other = get_engine().connect()
        other.execute(text("SET lock_timeout = '100ms'"))
        with pytest.raises(OperationalError) as error:
            other.execute(
                text("SELECT id FROM booking_holds WHERE id = :id FOR UPDATE"), {"id": ids[2]}
            )
        assert classify(error.value) is Classification.TRANSIENT  # 55P03 lock_not_available
        other.close()


def test_advisory_lock_is_exclusive_between_transactions(committed: Engine) -> None:
    first, second = new_session(), new_session()
    try:
        assert try_advisory_xact_lock(first, "job:test") is True
        assert try_advisory_xact_lock(second, "job:test") is False
        first.rollback()
        assert try_advisory_xact_lock(second, "job:test") is True
    finally:
        first.close()
        second.rollback()
        second.close()


def test_run_in_transaction_retries_a_real_deadlock(committed: Engine) -> None:
    """Two transactions lock two rows in opposite order; Postgres aborts one with 40P01, and
    the wrapper runs that one again."""
    with session_scope() as session:
        a, b = add_holds(session, [NOW, NOW])
    both_locked_first = threading.Barrier(2, timeout=10)
    attempts = {"forward": 0, "backward": 0}
    errors: list[BaseException] = []

    def work(name: str, first: int, second: int) -> None:
        def body(session: Session) -> None:
            attempts[name] += 1
            session.execute(update(BookingHold).where(BookingHold.id == first).values(user_id=name))
            if attempts[name] == 1:
                both_locked_first.wait()
            session.execute(
                update(BookingHold).where(BookingHold.id == second).values(user_id=name)
            )

        try:
            run_in_transaction(body, base_delay=0.01)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=("forward", a, b)),
        threading.Thread(target=work, args=("backward", b, a)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(attempts.values()) == [1, 2]  # the deadlock victim ran twice


def test_run_in_transaction_does_not_retry_other_errors(committed: Engine) -> None:
    calls = 0

    def body(session: Session) -> None:
        nonlocal calls
        calls += 1
        session.execute(text("SELECT 1/0"))

    with pytest.raises(DBAPIError):
        run_in_transaction(body)
    assert calls == 1


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
