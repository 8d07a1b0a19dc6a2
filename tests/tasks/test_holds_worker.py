"""Hold expiry end to end: real worker processes on the real Redis broker, tasks sent by name."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from tests.conftest import Proc, wait_until
from tests.workers.factories import add_hold
from workers.celery_app import app
from workers.models import BookingHold, DeadLetter, JobRun, Notification

pytestmark = pytest.mark.e2e


def now() -> datetime:
    return datetime.now(UTC)


def hold_status(engine: Engine, hold: int) -> str:
    with Session(engine) as session:
        return session.get(BookingHold, hold).status


def new_hold(engine: Engine, expires_at: datetime) -> int:
    with Session(engine) as session:
        hold = add_hold(session, expires_at)
        session.commit()
    return hold


def dead_letters(engine: Engine) -> list[DeadLetter]:
    with Session(engine) as session:
        return list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))


def test_holds_expire_sent_by_name_expires_the_hold_and_its_follow_up_runs(
    committed: Engine, start_worker: Callable[..., Proc]
) -> None:
    start_worker()
    hold = new_hold(committed, now() - timedelta(seconds=1))
    app.send_task("holds.expire", kwargs={"hold_id": hold})
    wait_until(lambda: hold_status(committed, hold) == "EXPIRED")
    with Session(committed) as session:
        note = wait_until(
            lambda: session.scalar(
                select(Notification).where(Notification.dedupe_key == f"hold-expired:{hold}")
            )
        )
    assert note.template == "hold_expired"


def test_early_expire_reschedules_itself_and_expires_when_due(
    committed: Engine, start_worker: Callable[..., Proc]
) -> None:
    start_worker()
    due = now() + timedelta(seconds=3)
    hold = new_hold(committed, due)
    app.send_task("holds.expire", kwargs={"hold_id": hold})
    wait_until(lambda: hold_status(committed, hold) == "EXPIRED", timeout=30)
    with Session(committed) as session:
        released = session.get(BookingHold, hold).released_at
    assert released >= due


BAD_PAYLOADS: list[tuple[dict[str, Any], str]] = [
    ({}, "hold_id: Field required"),
    ({"hold_id": "12"}, "hold_id: Input should be a valid integer"),
    ({"hold_id": 987654321}, "booking_holds 987654321 does not exist"),
    ({"hold_id": 1, "extra": True}, "extra: Extra inputs are not permitted"),
    ({"hold_id": -5}, "hold_id: Input should be greater than 0"),
    ({"hold_id": None}, "hold_id: Input should be a valid integer"),
]


def test_bad_payloads_land_in_dead_letters_and_the_worker_goes_on(
    committed: Engine, start_worker: Callable[..., Proc]
) -> None:
    worker = start_worker()
    for kwargs, _ in BAD_PAYLOADS:
        app.send_task("holds.expire", kwargs=kwargs)
    app.send_task("holds.expire", args=[1])
    wait_until(lambda: len(dead_letters(committed)) == len(BAD_PAYLOADS) + 1)
    letters = dead_letters(committed)
    by_payload = {repr(sorted(letter.payload.items())): letter for letter in letters}
    for kwargs, message in BAD_PAYLOADS:
        letter = by_payload[repr(sorted(kwargs.items()))]
        assert message in letter.error_message, (kwargs, letter.error_message)
        assert "\n" not in letter.error_message
        assert (letter.task_name, letter.classification, letter.attempts, letter.status) == (
            "holds.expire",
            "PERMANENT",
            1,
            "NEW",
        )
        assert letter.task_id and letter.traceback
    positional = by_payload[repr([("__args__", [1])])]
    assert "positional arguments are not accepted" in positional.error_message
    # The worker is alive and still expires holds.
    hold = new_hold(committed, now())
    app.send_task("holds.expire", kwargs={"hold_id": hold})
    wait_until(lambda: hold_status(committed, hold) == "EXPIRED")
    assert worker.popen.poll() is None


def _lock_hold_for(engine: Engine, hold: int, seconds: float, locked: threading.Event) -> None:
    with engine.connect() as conn, conn.begin():
        conn.execute(text("SELECT id FROM booking_holds WHERE id = :id FOR UPDATE"), {"id": hold})
        locked.set()
        conn.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})


def test_a_transient_error_is_retried_with_backoff_until_it_succeeds(
    committed: Engine, start_worker: Callable[..., Proc]
) -> None:
    """Another transaction holds the hold's row lock past the worker's lock_timeout (55P03):
    the worker retries instead of dead-lettering, and expires the hold once the lock is gone."""
    worker = start_worker(DB_LOCK_TIMEOUT_MS="300", TASK_RETRY_BASE_SECONDS="0.5")
    hold = new_hold(committed, now() - timedelta(seconds=1))
    locked = threading.Event()
    locker = threading.Thread(target=_lock_hold_for, args=(committed, hold, 2.5, locked))
    locker.start()
    locked.wait(5)
    app.send_task("holds.expire", kwargs={"hold_id": hold})
    locker.join()
    wait_until(lambda: hold_status(committed, hold) == "EXPIRED", timeout=30)
    assert "task.retry" in worker.output()
    # (The hold's waitlist notification may be dead-lettered on its own: no push provider here.)
    assert [
        letter for letter in dead_letters(committed) if letter.task_name == "holds.expire"
    ] == []


def test_exhausted_retries_end_in_dead_letters_as_transient(
    committed: Engine, start_worker: Callable[..., Proc]
) -> None:
    start_worker(DB_LOCK_TIMEOUT_MS="200", TASK_RETRY_BASE_SECONDS="0.2", TASK_MAX_RETRIES="2")
    hold = new_hold(committed, now() - timedelta(seconds=1))
    locked = threading.Event()
    locker = threading.Thread(target=_lock_hold_for, args=(committed, hold, 6, locked))
    locker.start()
    locked.wait(5)
    app.send_task("holds.expire", kwargs={"hold_id": hold})
    letters = wait_until(lambda: dead_letters(committed), timeout=30)
    locker.join()
    letter = letters[0]
    assert (letter.classification, letter.attempts, letter.payload) == (
        "TRANSIENT",
        3,
        {"hold_id": hold},
    )
    assert letter.error_type == "OperationalError" and "lock timeout" in letter.error_message
    assert hold_status(committed, hold) == "ACTIVE"


def test_beat_sweeps_due_holds_and_records_its_runs(
    committed: Engine, start_worker: Callable[..., Proc], tmp_path: Any
) -> None:
    start_worker("--beat", f"--schedule={tmp_path / 'beat-schedule'}", HOLD_SWEEP_SECONDS="1")
    holds = [new_hold(committed, now() + timedelta(seconds=s)) for s in (0, 1, 2)]
    wait_until(lambda: all(hold_status(committed, h) == "EXPIRED" for h in holds), timeout=30)
    with Session(committed) as session:
        run = wait_until(
            lambda: session.scalar(
                select(JobRun)
                .where(JobRun.job_name == "holds.sweep_expired")
                .execution_options(populate_existing=True)
            )
        )
        assert run.outcome == "OK" and run.runs >= 1 and run.finished_at is not None
        expired_by_sweep = session.scalar(
            text("SELECT count(*) FROM state_transitions WHERE actor = 'holds.sweep_expired'")
        )
        assert expired_by_sweep == 3
        assert session.scalar(select(func.sum(JobRun.runs))) >= 1
