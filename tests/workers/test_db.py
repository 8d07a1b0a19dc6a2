"""Sessions, timeouts, lock helpers and the deadlock retry wrapper, on real Postgres."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import DBAPIError, OperationalError

from tests.conftest import utc
from tests.workers.factories import add_holds
from workers.db import (
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
