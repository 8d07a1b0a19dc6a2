"""Retry limits at the values production runs with, through a real worker on Redis.

Every family of tasks that retries is driven to exhaustion with the default TASK_MAX_RETRIES
(only the backoff is shortened): each ends in one dead letter whose `attempts` is the limit + 1,
and the fault source (the gateway simulator, PostgreSQL's own log, the SMS provider) saw exactly
that many tries. A limit tested only at 1 or 2 hides any lower limit a library keeps for itself:
Celery's own `max_retries = 3` once cut every task short after its fourth try, silently.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from config.settings import Settings
from tests.conftest import wait_until
from tests.processes import Proc
from tests.workers.factories import add_hold, add_refund
from workers.celery_app import app
from workers.db import session_scope
from workers.devtools.simulator import sign_razorpay
from workers.errors import Classification, TransientError
from workers.models import DeadLetter, Notification, Payment, Refund

pytestmark = pytest.mark.e2e

DEFAULT_MAX_RETRIES: int = Settings.model_fields["TASK_MAX_RETRIES"].default
DEFAULT_NOTIFY_ATTEMPTS: int = Settings.model_fields["NOTIFY_MAX_ATTEMPTS"].default
# Only the waiting is shortened; every limit keeps its default.
FAST_BACKOFF = {"TASK_RETRY_BASE_SECONDS": "0.05", "TASK_RETRY_MAX_SECONDS": "1"}
LOCK_TIMEOUT = "canceling statement due to lock timeout"


def test_the_limits_under_test_are_the_defaults() -> None:
    assert "TASK_MAX_RETRIES" not in os.environ and "NOTIFY_MAX_ATTEMPTS" not in os.environ
    assert DEFAULT_MAX_RETRIES > 3  # above Celery's own default, or this file proves nothing


def letters(engine: Engine, task_name: str | None = None) -> list[DeadLetter]:
    with Session(engine) as session:
        query = select(DeadLetter).order_by(DeadLetter.id)
        if task_name is not None:
            query = query.where(DeadLetter.task_name == task_name)
        return list(session.scalars(query))


def postgres_errors(message: str) -> int:
    """How many times PostgreSQL reported `message` in its log since it started."""
    return Path(os.environ["POSTGRES_LOG"]).read_text(errors="replace").count(message)


@contextmanager
def row_locked(engine: Engine, table: str, row_id: int) -> Iterator[None]:
    """Hold `table`'s row `row_id` locked, as a long transaction elsewhere would."""
    with engine.connect() as conn:
        conn.begin()
        conn.execute(text(f"SELECT id FROM {table} WHERE id = :id FOR UPDATE"), {"id": row_id})
        try:
            yield
        finally:
            conn.rollback()


def failed_task_ids(worker: Proc, task_name: str) -> set[str]:
    """Tasks the worker logged as failed ("raised unexpected")."""
    pattern = re.escape(task_name) + r"\[([0-9a-f-]{36})\] raised unexpected"
    return set(re.findall(pattern, worker.output()))


def gateway_worker(start_worker: Callable[..., Proc], simulator_server: Any, **extra: str) -> Proc:
    return start_worker(
        **simulator_server.gateway_env(),
        **FAST_BACKOFF,
        GATEWAY_TIMEOUT_SECONDS="2",
        # Each task's own retries are under test, not the breaker that would defer them.
        BREAKER_FAIL_MAX="100000",
        **extra,
    )


def test_refunds_submit_exhausts_the_default_limit_into_dead_letters(
    committed: Engine, start_worker: Callable[..., Proc], simulator_server: Any, sim: Any
) -> None:
    worker = gateway_worker(start_worker, simulator_server)
    sim.add_fault("*.refund.create", "503")
    refunds = [add_refund(sim, gateway) for gateway in ("razorpay", "stripe", "razorpay")]
    for refund_id in refunds:
        app.send_task("refunds.submit", kwargs={"refund_id": refund_id})
    found = wait_until(lambda: len(letters(committed)) == len(refunds) and letters(committed))
    tries = DEFAULT_MAX_RETRIES + 1
    assert sorted(letter.payload["refund_id"] for letter in found) == sorted(refunds)
    for letter in found:
        assert (letter.task_name, letter.attempts, letter.classification) == (
            "refunds.submit",
            tries,
            "TRANSIENT",
        )
        assert letter.error_type == "GatewayTransient" and "503" in letter.error_message
    requests = sim.stats()["requests"]
    assert requests["razorpay.refund.create"] == 2 * tries
    assert requests["stripe.refund.create"] == tries
    assert sim.effects()["refunds_created"] == 0
    with Session(committed) as session:
        rows = session.scalars(select(Refund).where(Refund.id.in_(refunds))).all()
        assert {(r.status, r.in_flight_until) for r in rows} == {("PENDING", None)}
    assert failed_task_ids(worker, "refunds.submit") == {letter.task_id for letter in found}


def test_every_refund_the_worker_gives_up_on_has_its_dead_letter(
    committed: Engine, start_worker: Callable[..., Proc], simulator_server: Any, sim: Any
) -> None:
    """The issue's run: an operator's TASK_MAX_RETRIES=6 and a gateway that always answers
    503. Celery's hidden limit once gave 4 tries each and no dead letter at all."""
    worker = gateway_worker(start_worker, simulator_server, TASK_MAX_RETRIES="6")
    sim.add_fault("razorpay.refund.create", "503")
    refunds = [add_refund(sim, "razorpay") for _ in range(20)]
    for refund_id in refunds:
        app.send_task("refunds.submit", kwargs={"refund_id": refund_id})
    found = wait_until(
        lambda: len(letters(committed)) == len(refunds) and letters(committed), timeout=90
    )
    assert {letter.attempts for letter in found} == {7}
    assert sim.stats()["requests"]["razorpay.refund.create"] == 20 * 7
    failed = wait_until(lambda: len(failed_task_ids(worker, "refunds.submit")) == 20)
    assert failed and failed_task_ids(worker, "refunds.submit") == {
        letter.task_id for letter in found
    }


def test_webhooks_process_exhausts_the_default_limit_while_the_database_refuses(
    committed: Engine, start_worker: Callable[..., Proc], simulator_server: Any, sim: Any
) -> None:
    secret = "rzp_whsec_retry_limits"
    start_worker(**FAST_BACKOFF, DB_LOCK_TIMEOUT_MS="200", RAZORPAY_WEBHOOK_SECRET=secret)
    gateway_id = sim.add_payment("razorpay", amount=5_000, currency="INR", status="captured")["id"]
    with session_scope() as session:
        payment = Payment(
            gateway="razorpay",
            gateway_payment_id=gateway_id,
            amount=5_000,
            currency="INR",
            status="PENDING",
        )
        session.add(payment)
        session.flush()
        payment_id = payment.id
    body = sim.webhook_event("razorpay", "payment.captured", gateway_id)
    before = postgres_errors(LOCK_TIMEOUT)
    with row_locked(committed, "payments", payment_id):
        app.send_task(
            "webhooks.process",
            kwargs={"provider": "razorpay", "body": body, "signature": sign_razorpay(body, secret)},
        )
        [letter] = wait_until(lambda: letters(committed), timeout=60)
    assert (letter.task_name, letter.attempts, letter.classification) == (
        "webhooks.process",
        DEFAULT_MAX_RETRIES + 1,
        "TRANSIENT",
    )
    assert "lock timeout" in letter.error_message
    assert postgres_errors(LOCK_TIMEOUT) - before == DEFAULT_MAX_RETRIES + 1
    with Session(committed) as session:
        assert session.get(Payment, payment_id).status == "PENDING"


def test_holds_expire_exhausts_the_default_limit_while_the_database_refuses(
    committed: Engine, start_worker: Callable[..., Proc]
) -> None:
    start_worker(**FAST_BACKOFF, DB_LOCK_TIMEOUT_MS="200")
    with session_scope() as session:
        hold = add_hold(session, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    before = postgres_errors(LOCK_TIMEOUT)
    with row_locked(committed, "booking_holds", hold):
        app.send_task("holds.expire", kwargs={"hold_id": hold})
        [letter] = wait_until(lambda: letters(committed), timeout=60)
    assert (letter.task_name, letter.attempts, letter.classification, letter.payload) == (
        "holds.expire",
        DEFAULT_MAX_RETRIES + 1,
        "TRANSIENT",
        {"hold_id": hold},
    )
    assert postgres_errors(LOCK_TIMEOUT) - before == DEFAULT_MAX_RETRIES + 1


def test_notifications_send_exhausts_its_own_default_attempts(
    committed: Engine, start_worker: Callable[..., Proc], sandbox_server: Any, sandbox: Any
) -> None:
    start_worker(
        **FAST_BACKOFF,
        SMS_PROVIDER_URL=sandbox_server.url,
        SMS_PROVIDER_API_KEY=sandbox_server.state.api_key,
        NOTIFY_BACKOFF_SECONDS="0.05",
    )
    sandbox.add_fault("sms", "503")
    app.send_task(
        "notifications.send",
        kwargs={
            "channel": "sms",
            "recipient": "+14155550123",
            "template": "booking_confirmed",
            "data": {"resource_id": "court-7", "start_time": "18:00"},
            "dedupe_key": "retry-limits-1",
        },
    )
    [letter] = wait_until(lambda: letters(committed), timeout=60)
    with Session(committed) as session:
        [row] = session.scalars(select(Notification)).all()
    assert (row.status, row.attempts) == ("DEAD", DEFAULT_NOTIFY_ATTEMPTS)
    assert (letter.attempts, letter.classification) == (DEFAULT_NOTIFY_ATTEMPTS, "TRANSIENT")
    assert sandbox.stats()["requests"] == {"sms": DEFAULT_NOTIFY_ATTEMPTS}


def test_a_replay_that_fails_again_exhausts_the_default_limit_and_reopens_its_letter(
    committed: Engine, start_worker: Callable[..., Proc], simulator_server: Any, sim: Any
) -> None:
    from workers.dead_letters import record_dead_letter

    gateway_worker(start_worker, simulator_server)
    sim.add_fault("stripe.refund.create", "503")
    refund_id = add_refund(sim, "stripe")
    with session_scope() as session:
        letter_id = record_dead_letter(
            session,
            task_name="refunds.submit",
            task_id="the-first-run",
            payload={"refund_id": refund_id},
            error=TransientError("stripe refunds.create: HTTP 503"),
            attempts=4,
            classification=Classification.TRANSIENT,
            now=datetime.now(UTC),
        )
    app.send_task("dlq.replay", kwargs={"dead_letter_id": letter_id, "actor": "alice"})

    def reopened() -> DeadLetter | None:
        [letter] = letters(committed)
        return letter if letter.status == "NEW" and letter.attempts > 4 else None

    letter = wait_until(reopened, timeout=60)
    assert letter.attempts == 4 + DEFAULT_MAX_RETRIES + 1
    assert letter.error_type == "GatewayTransient" and letter.task_id != "the-first-run"
    assert sim.stats()["requests"]["stripe.refund.create"] == DEFAULT_MAX_RETRIES + 1


def test_a_retry_the_broker_refuses_is_kept_as_a_dead_letter(
    committed: Engine, start_worker: Callable[..., Proc], redis: Any
) -> None:
    """Celery answers a retry it cannot publish by rejecting the message in hand without
    requeueing it; the base task keeps the work as a transient dead letter for triage."""
    worker = start_worker("-I", "tests.observe_tasks", **FAST_BACKOFF)
    try:
        app.send_task("observe.broker_full", kwargs={"token": "full"}, queue="default")
        [letter] = wait_until(lambda: letters(committed), timeout=30)
    finally:
        redis.config_set("maxmemory", "0")
    assert (letter.task_name, letter.attempts, letter.classification, letter.payload) == (
        "observe.broker_full",
        1,
        "TRANSIENT",
        {"token": "full"},
    )
    assert "task.retry_not_sent" in worker.output() and "maxmemory" in worker.output()


def test_no_task_may_set_a_retry_limit_of_its_own() -> None:
    from workers.base import task

    for option in ({"max_retries": 3}, {"autoretry_for": (Exception,)}):
        with pytest.raises(TypeError, match="retry decision"):
            task("observe.own_limit", **option)


def observe_worker(start_worker: Callable[..., Proc], **env: str) -> Proc:
    return start_worker("-I", "tests.observe_tasks", **FAST_BACKOFF, **env)


def test_a_task_past_its_soft_time_limit_is_retried_to_the_default_limit(
    committed: Engine, start_worker: Callable[..., Proc]
) -> None:
    observe_worker(start_worker, TASK_SOFT_TIME_LIMIT_SECONDS="1", TASK_TIME_LIMIT_SECONDS="30")
    app.send_task("observe.ok", kwargs={"seconds": 5}, queue="default")
    [letter] = wait_until(lambda: letters(committed), timeout=60)
    assert (letter.error_type, letter.classification, letter.attempts) == (
        "SoftTimeLimitExceeded",
        "TRANSIENT",
        DEFAULT_MAX_RETRIES + 1,
    )


def test_time_limits_in_a_message_do_not_override_the_workers(
    committed: Engine, start_worker: Callable[..., Proc]
) -> None:
    """Celery 5.7 copies a task's time limits into every message a process sends for a task it
    has registered (`send_task` merges the task's options): a CLI, beat or another worker with
    other settings would impose its own. The limits are the worker's settings, whatever the
    message says; a longer one could outlast the visibility timeout and run the task twice."""
    observe_worker(start_worker, TASK_SOFT_TIME_LIMIT_SECONDS="1", TASK_TIME_LIMIT_SECONDS="30")
    app.send_task(
        "observe.ok",
        kwargs={"seconds": 5},
        queue="default",
        soft_time_limit=1800,
        time_limit=1900,
    )
    [letter] = wait_until(lambda: letters(committed), timeout=60)
    assert (letter.error_type, letter.attempts) == (
        "SoftTimeLimitExceeded",
        DEFAULT_MAX_RETRIES + 1,
    )


def test_a_task_killed_at_its_hard_time_limit_is_dead_lettered_not_lost(
    committed: Engine, start_worker: Callable[..., Proc]
) -> None:
    """Celery acks a message whose process it killed at the hard limit: the request writes
    the dead letter first. The worker replaces the process and goes on."""
    worker = observe_worker(
        start_worker, TASK_SOFT_TIME_LIMIT_SECONDS="1", TASK_TIME_LIMIT_SECONDS="2"
    )
    app.send_task("observe.stubborn", kwargs={"seconds": 20}, queue="default")
    [letter] = wait_until(lambda: letters(committed), timeout=30)
    assert (letter.task_name, letter.error_type, letter.attempts, letter.payload) == (
        "observe.stubborn",
        "TimeLimitExceeded",
        1,
        {"seconds": 20},
    )
    assert "hard time limit" in letter.error_message
    assert "observe.soft_limit_ignored" in worker.output()
    app.send_task("observe.ok", kwargs={}, queue="default")
    wait_until(lambda: re.search(r"observe\.ok\[[0-9a-f-]+\] succeeded", worker.output()))


def test_a_task_killed_at_its_hard_limit_while_its_letter_cannot_be_written_runs_again(
    committed: Engine, start_worker: Callable[..., Proc]
) -> None:
    """Celery acks a killed task's message right after telling us; if the dead letter cannot
    be written at that moment (the table locked, here), the message goes back to its queue
    instead, and the task is dead-lettered on its next kill."""
    worker = observe_worker(
        start_worker,
        TASK_SOFT_TIME_LIMIT_SECONDS="1",
        TASK_TIME_LIMIT_SECONDS="2",
        DB_LOCK_TIMEOUT_MS="200",
    )
    with committed.connect() as conn:
        conn.begin()
        conn.execute(text("LOCK TABLE dead_letters IN ACCESS EXCLUSIVE MODE"))
        app.send_task("observe.stubborn", kwargs={"seconds": 20}, queue="default")
        wait_until(lambda: "dead_letter.write_failed" in worker.output(), timeout=30)
        conn.rollback()
    [letter] = wait_until(lambda: letters(committed), timeout=30)
    assert letter.error_type == "TimeLimitExceeded"
    assert worker.output().count("observe.soft_limit_ignored") == 2  # it ran twice


def test_a_task_deferred_past_its_limit_becomes_a_dead_letter_for_a_person(
    committed: Engine, start_worker: Callable[..., Proc], redis: Any
) -> None:
    from workers.dlq.rules import match

    observe_worker(start_worker, TASK_DEFER_MAX_SECONDS="3")
    app.send_task("observe.always_defer", kwargs={"token": "outage"}, queue="default")
    [letter] = wait_until(lambda: letters(committed), timeout=30)
    runs = int(redis.get("observe:outage"))
    assert runs == 3  # deferred after ~0, ~1.1 and ~3.4 s: the third run is past 3 s
    assert (letter.error_type, letter.classification, letter.attempts) == (
        "DeferredTooLong",
        "TRANSIENT",
        1,  # deferrals spend no retries
    )
    assert "deferred 2 times" in letter.error_message
    assert "TASK_DEFER_MAX_SECONDS (3)" in letter.error_message
    assert match(letter).name == "deferred-too-long"


def test_a_replay_that_keeps_deferring_is_not_given_up_as_stale(
    committed: Engine, start_worker: Callable[..., Proc]
) -> None:
    """A replay may defer for up to TASK_DEFER_MAX_SECONDS (a day), longer than triage waits
    for a replay's outcome (DLQ_REPLAY_STALE_SECONDS, 6 h): each deferral says it is alive."""
    from workers.dlq.triage import TriagePolicy, give_up_stale

    observe_worker(start_worker)
    with session_scope() as session:
        letter_id = record_letter(session, "observe.always_defer", {"token": "replayed"})
    app.send_task("dlq.replay", kwargs={"dead_letter_id": letter_id, "actor": "alice"})
    with Session(committed) as session:
        replayed_at = wait_until(
            lambda: session.scalar(
                select(DeadLetter.last_replayed_at)
                .where(DeadLetter.id == letter_id, DeadLetter.status == "RETRYING")
                .execution_options(populate_existing=True)
            )
        )

    def moved_on() -> object:
        with Session(committed) as session:
            letter = session.get(DeadLetter, letter_id)
            return letter.last_replayed_at > replayed_at + timedelta(seconds=1) and letter

    letter = wait_until(moved_on, timeout=20)
    stale_after = timedelta(seconds=2)
    with session_scope() as session:
        policy = TriagePolicy(
            manual_after=timedelta(days=1), replay_budget=3, stale_after=stale_after
        )
        given_up = give_up_stale(session, replayed_at + stale_after, policy, "test")
    assert given_up == 0 and letter.status == "RETRYING"


def record_letter(session: Session, task_name: str, payload: dict[str, Any]) -> int:
    from workers.dead_letters import record_dead_letter

    return record_dead_letter(
        session,
        task_name=task_name,
        task_id="the-first-run",
        payload=payload,
        error=TransientError("busy"),
        attempts=1,
        classification=Classification.TRANSIENT,
        now=datetime.now(UTC),
    )


def test_a_task_that_kills_its_process_is_dead_lettered_after_the_default_deaths(
    committed: Engine, start_worker: Callable[..., Proc], redis: Any
) -> None:
    """`reject_on_worker_lost` puts a task whose process died back on the queue; one that
    kills every process it runs in would loop for ever."""
    worker = observe_worker(start_worker)
    app.send_task("observe.fatal", kwargs={"token": "poison"}, queue="default")
    [letter] = wait_until(lambda: letters(committed), timeout=60)
    deaths = Settings.model_fields["TASK_MAX_PROCESS_DEATHS"].default
    assert (letter.task_name, letter.error_type, letter.classification) == (
        "observe.fatal",
        "TaskKillsItsProcess",
        "PERMANENT",
    )
    assert f"died {deaths} times" in letter.error_message
    assert int(redis.get("observe:poison")) == deaths
    app.send_task("observe.ok", kwargs={}, queue="default")
    wait_until(lambda: re.search(r"observe\.ok\[[0-9a-f-]+\] succeeded", worker.output()))
    assert int(redis.get("observe:poison")) == deaths  # not run again
