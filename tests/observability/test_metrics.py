"""Prometheus metrics: task metrics added up across a prefork worker's processes, and the
business gauges, read over HTTP from `backstop metrics` as Prometheus would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import Engine, insert
from sqlalchemy.orm import Session

from config.settings import load_settings
from tests.conftest import BROKER_URL, service_env, wait_until
from tests.observability.metrics_helpers import Samples, exporter, parse, scrape, value
from tests.processes import ROOT, Proc
from workers.db import session_scope
from workers.gateways.breaker import make_breaker
from workers.models import BookingHold, DeadLetter, JobRun, Payment, Refund, ScheduledJob
from workers.observability.business_metrics import BusinessMetrics
from workers.observability.metrics import LOCK_FILE, node_dir

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def seed(session: Session, now: datetime) -> None:
    """One of each thing the business gauges count, and a near miss beside each."""
    ago = lambda **kw: now - timedelta(**kw)  # noqa: E731
    letter = {"task_name": "refunds.submit", "error_type": "X", "error_message": "m"}
    session.execute(
        insert(DeadLetter),
        [
            {**letter, "classification": "TRANSIENT", "status": "NEW", "created_at": ago(hours=1)},
            {**letter, "classification": "TRANSIENT", "status": "NEW", "created_at": ago(hours=2)},
            {
                **letter,
                "classification": "PERMANENT",
                "status": "MANUAL_REVIEW",
                "created_at": ago(hours=3),
            },
            {
                **letter,
                "classification": "PERMANENT",
                "status": "REPLAYED",
                "created_at": ago(days=9),
            },
        ],
    )
    pay = {"amount": 5000, "status": "COMPLETED"}
    razorpay, stripe = session.execute(
        insert(Payment).returning(Payment.id),
        [
            {**pay, "gateway": "razorpay", "currency": "INR"},
            {**pay, "gateway": "stripe", "currency": "USD"},
        ],
    ).scalars()
    refund = {"amount": 100, "currency": "INR"}
    session.execute(
        insert(Refund),
        [
            # stuck: PROCESSING for 2 hours (REFUND_STUCK_AFTER_SECONDS is an hour)
            {**refund, "payment_id": razorpay, "status": "PROCESSING", "updated_at": ago(hours=2)},
            {**refund, "payment_id": stripe, "status": "PROCESSING", "updated_at": ago(minutes=10)},
            # awaiting manual review, and one resolved since
            {**refund, "payment_id": stripe, "status": "FAILED", "requires_manual_review": True},
            {
                **refund,
                "payment_id": razorpay,
                "status": "COMPLETED",
                "requires_manual_review": True,
            },
        ],
    )
    hold = {"resource_id": "r", "user_id": "u", "start_time": now, "end_time": now}
    session.execute(
        insert(BookingHold),
        [
            {**hold, "status": "ACTIVE", "expires_at": ago(seconds=90)},
            {**hold, "status": "ACTIVE", "expires_at": ago(seconds=30)},
            {**hold, "status": "ACTIVE", "expires_at": now + timedelta(hours=1)},
            {**hold, "status": "EXPIRED", "expires_at": ago(hours=1)},
        ],
    )
    run = {"counts": {}}
    session.execute(
        insert(JobRun),
        [
            {
                **run,
                "job_name": "refunds.retry_stuck",
                "started_at": ago(minutes=11),
                "finished_at": ago(minutes=10),
                "outcome": "OK",
            },
            {
                **run,
                "job_name": "dlq.triage",
                "started_at": ago(minutes=21),
                "finished_at": ago(minutes=20),
                "outcome": "OK",
            },
            {
                **run,
                "job_name": "dlq.triage",
                "started_at": ago(minutes=2),
                "finished_at": ago(minutes=1),
                "outcome": "FAILED",
            },
        ],
    )
    session.execute(
        insert(ScheduledJob),
        [
            {"job_name": "refunds.retry_stuck", "first_seen_at": ago(days=3)},
            {"job_name": "reconciliation.nightly", "first_seen_at": ago(hours=5)},
        ],
    )


def check_business_gauges(
    samples: Samples, slack: float = 0.0, new_letters: tuple[int, int] = (0, 0)
) -> None:
    """The gauges for `seed`'s rows; ages may have grown by up to `slack` seconds, and tasks
    may have added `new_letters` (TRANSIENT, PERMANENT) NEW dead letters of their own."""

    def near(name: str, expected: float, **labels: str) -> None:
        got = value(samples, name, **labels)
        assert got is not None and expected <= got <= expected + slack, (name, labels, got)

    transient, permanent = new_letters
    new = value(samples, "backstop_dead_letters", classification="TRANSIENT", status="NEW")
    assert new == 2 + transient
    new = value(samples, "backstop_dead_letters", classification="PERMANENT", status="NEW")
    assert new == permanent
    assert (
        value(samples, "backstop_dead_letters", classification="PERMANENT", status="MANUAL_REVIEW")
        == 1
    )
    assert value(samples, "backstop_dead_letters", classification="UNKNOWN", status="NEW") == 0
    assert (
        value(samples, "backstop_dead_letters", classification="PERMANENT", status="REPLAYED")
        is None
    )
    near("backstop_dead_letters_oldest_age_seconds", 7200, status="NEW")
    near("backstop_dead_letters_oldest_age_seconds", 10800, status="MANUAL_REVIEW")
    assert value(samples, "backstop_dead_letters_oldest_age_seconds", status="RETRYING") == 0
    assert value(samples, "backstop_refunds_stuck", gateway="razorpay") == 1
    assert value(samples, "backstop_refunds_stuck", gateway="stripe") == 0
    assert value(samples, "backstop_refunds_manual_review", gateway="stripe") == 1
    assert value(samples, "backstop_refunds_manual_review", gateway="razorpay") == 0
    assert value(samples, "backstop_holds_overdue") == 2
    near("backstop_hold_expiry_lag_seconds", 90)
    near("backstop_job_last_success_age_seconds", 600, job_name="refunds.retry_stuck")
    near("backstop_job_last_success_age_seconds", 1200, job_name="dlq.triage")
    assert (
        value(samples, "backstop_job_last_success_age_seconds", job_name="holds.sweep_expired")
        is None
    )
    assert value(samples, "backstop_job_window_seconds", job_name="refunds.retry_stuck") == 2400
    near("backstop_job_first_seen_age_seconds", 3 * 86400, job_name="refunds.retry_stuck")
    near("backstop_job_first_seen_age_seconds", 5 * 3600, job_name="reconciliation.nightly")
    assert value(samples, "backstop_job_first_seen_age_seconds", job_name="dlq.triage") is None
    assert value(samples, "backstop_metrics_source_up", source="database") == 1


def collected(collector: Any) -> Samples:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(collector)
    return parse(generate_latest(registry).decode())


def test_business_gauges_count_what_on_call_pages_on(any_db: Session) -> None:
    seed(any_db, NOW)
    settings = load_settings(BROKER_URL=BROKER_URL)
    samples = collected(
        BusinessMetrics(settings, sessions=lambda: nullcontext(any_db), clock=lambda: NOW)
    )
    check_business_gauges(samples)


def test_a_source_that_cannot_be_read_is_reported_down_not_fatal(
    db: Session, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(BROKER_URL="redis://:brokerpw@127.0.0.1:1/0")
    samples = collected(
        BusinessMetrics(settings, sessions=lambda: nullcontext(db), clock=lambda: NOW)
    )
    assert value(samples, "backstop_metrics_source_up", source="broker") == 0
    assert value(samples, "backstop_metrics_source_up", source="database") == 1
    assert value(samples, "backstop_queue_depth", queue="critical") is None
    assert "metrics.source_failed" in caplog.messages
    assert "brokerpw" not in caplog.text


def add_counter(folder: Path, amount: int) -> None:
    """A metrics file as a worker process leaves it, with backstop_tasks_total incremented."""
    code = (
        "from workers.observability.metrics import TASKS; "
        f"TASKS.labels('observe.ok', 'success').inc({amount})"
    )
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True, timeout=60)


@pytest.fixture
def start_exporter(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], int]]:
    """Start `backstop metrics` with an environment; returns its port. Stopped at teardown."""
    started: list[Proc] = []

    def start(env: dict[str, str]) -> int:
        proc, port = exporter(env, tmp_path / f"exporter{len(started)}.log")
        started.append(proc)
        return port

    yield start
    for proc in started:
        assert proc.stop() == 0, proc.output()[-2000:]  # SIGTERM: a clean exit


@pytest.mark.e2e
def test_exporter_adds_up_a_prefork_worker_and_reads_the_business_gauges(
    start_worker: Callable[..., Proc],
    start_exporter: Callable[[dict[str, str]], int],
    committed: Engine,
    redis: redis_lib.Redis,
    tmp_path: Path,
) -> None:
    root = tmp_path / "metrics"
    node = node_dir(root, f"test0@{socket.gethostname()}")
    add_counter(node, 1000)  # left by the node's previous run: emptied when it starts
    add_counter(root / "gone@elsewhere", 500)  # a node that is not running: not reported
    (root / "gone@elsewhere" / LOCK_FILE).touch()
    assert list(node.glob("counter_*.db")) and list((root / "gone@elsewhere").glob("counter_*.db"))
    env = {
        "PROMETHEUS_MULTIPROC_DIR": str(root),
        "TASK_MAX_RETRIES": "2",
        "TASK_RETRY_BASE_SECONDS": "0.05",
        "RAZORPAY_KEY_ID": "rzp_test_x",
        "RAZORPAY_KEY_SECRET": "not-a-real-secret",
    }
    # The worker leaves `batch` alone, so its backlog stays put for the depth gauge.
    start_worker("-I", "tests.observe_tasks", queues="critical,default,notifications", **env)
    port = start_exporter(service_env(**env))

    from workers.celery_app import app

    for _ in range(20):
        app.send_task("observe.ok", kwargs={})
    for _ in range(2):  # two at once: each pool process runs one
        app.send_task("observe.ok", kwargs={"seconds": 0.5})
    app.send_task("observe.flaky", kwargs={"token": "twice", "failures": 2})
    app.send_task("observe.flaky", kwargs={"token": "always", "failures": 99})
    app.send_task("observe.boom", kwargs={})
    app.send_task("observe.defer", kwargs={"token": "later"})
    redis.lpush("batch", *[b"{}"] * 3)
    redis.lpush("batch\x06\x163", *[b"{}"] * 2)  # kombu's list for priority 3
    with session_scope() as session:
        seed(session, datetime.now(UTC))
    make_breaker("razorpay", fail_max=1, reset_seconds=600, redis=redis).open()

    expected = {
        ("observe.ok", "success"): 22,
        ("observe.flaky", "retry"): 4,
        ("observe.flaky", "success"): 1,
        ("observe.flaky", "failure"): 1,
        ("observe.boom", "failure"): 1,
        ("observe.defer", "deferred"): 1,
        ("observe.defer", "success"): 1,
    }

    def counts() -> dict[tuple[str, str], float | None]:
        samples = scrape(port)
        return {
            key: value(samples, "backstop_tasks_total", task=key[0], outcome=key[1])
            for key in expected
        }

    wait_until(lambda: counts() == expected, timeout=30)
    samples = scrape(port)
    # The series the alert rules count exist at 0 from the start: a counter that appeared
    # with its first failure would have no earlier sample, and increase() would miss it.
    assert value(samples, "backstop_tasks_total", task="observe.ok", outcome="failure") == 0
    assert value(samples, "backstop_tasks_total", task="refunds.submit", outcome="failure") == 0
    assert value(samples, "backstop_rejected_messages_total", reason="undecodable") == 0
    assert (
        value(samples, "backstop_task_retries_total", task="observe.flaky", reason="TransientError")
        == 4
    )
    assert (
        value(samples, "backstop_task_duration_seconds_count", task="observe.ok", outcome="success")
        == 22
    )
    # The two slow runs took half a second each.
    assert (
        value(
            samples,
            "backstop_task_duration_seconds_bucket",
            task="observe.ok",
            outcome="success",
            le="0.25",
        )
        == 20
    )
    assert value(samples, "backstop_tasks_in_progress", task="observe.ok") == 0
    # The counts came from both pool processes, added up.
    pids = {path.stem.split("_")[-1] for path in node.glob("counter_*.db")}
    assert len(pids) >= 2, pids

    # observe.flaky out of retries (TRANSIENT) and observe.boom (PERMANENT) are dead letters too.
    check_business_gauges(samples, slack=60, new_letters=(1, 1))
    assert value(samples, "backstop_queue_depth", queue="batch") == 5
    assert value(samples, "backstop_queue_depth", queue="critical") == 0
    state = {
        s: value(samples, "backstop_circuit_breaker_state", gateway="razorpay", state=s)
        for s in ("closed", "half-open", "open")
    }
    assert state == {"closed": 0, "half-open": 0, "open": 1}
    assert (
        value(samples, "backstop_circuit_breaker_state", gateway="stripe", state="closed") is None
    )


@pytest.mark.e2e
def test_exporter_on_the_embedded_default(
    tmp_path: Path, start_exporter: Callable[[dict[str, str]], int]
) -> None:
    """SQLite and the filesystem broker: the gauges it can read, queue depth from the files."""
    from tests.test_embedded import backstop, embedded_env

    env = embedded_env(tmp_path)
    backstop(env, "db", "upgrade")
    messages = tmp_path / "broker" / "messages"
    messages.mkdir(parents=True)
    for i in range(2):
        (messages / f"{1000 + i}_id{i}.batch.msg").write_text("{}")
    samples = scrape(start_exporter(env))
    assert value(samples, "backstop_metrics_source_up", source="database") == 1
    assert value(samples, "backstop_metrics_source_up", source="broker") == 1
    assert value(samples, "backstop_queue_depth", queue="batch") == 2
    assert value(samples, "backstop_queue_depth", queue="critical") == 0
    assert value(samples, "backstop_dead_letters", classification="UNKNOWN", status="NEW") == 0
    assert not any(name.startswith("backstop_circuit_breaker") for name, _ in samples)
