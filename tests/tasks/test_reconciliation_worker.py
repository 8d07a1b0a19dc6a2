"""Reconciliation and webhooks end to end: tasks sent by name to real workers on Redis, the
workers' official SDKs talking HTTP to the simulator. A slow reconciliation on the `batch`
worker never holds up a hold expiry on the `critical` one."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select
from sqlalchemy.orm import Session

from tests.conftest import wait_until
from tests.processes import Proc
from tests.tasks.test_refunds_worker import worker_env
from tests.workers.factories import add_hold
from workers.celery_app import app
from workers.devtools.simulator import sign_razorpay, sign_stripe
from workers.models import (
    BookingHold,
    DeadLetter,
    JobRun,
    Payment,
    ReconciliationRun,
    WebhookEvent,
)

pytestmark = pytest.mark.e2e

SECRETS = {
    "RAZORPAY_WEBHOOK_SECRET": "rzp_whsec_e2e_0123",
    "STRIPE_WEBHOOK_SECRET": "whsec_e2e_0123",
}


def env(server: Any, sim: Any) -> dict[str, str]:
    return {
        **worker_env(server),
        **SECRETS,
        "TIMEZONE": "UTC",
        "RECONCILE_CATCHUP_DAYS": "1",
        "RECONCILE_CONCURRENCY": "1",
    }


def add_payment(engine: Engine, gateway: str, gateway_id: str, status: str, at: datetime) -> int:
    currency = "INR" if gateway == "razorpay" else "USD"
    with Session(engine) as session:
        payment = session.execute(
            insert(Payment)
            .values(
                gateway=gateway,
                gateway_payment_id=gateway_id,
                amount=5_000,
                currency=currency,
                status=status,
                created_at=at,
                updated_at=at,
            )
            .returning(Payment.id)
        ).scalar_one()
        session.commit()
    return int(payment)


def runs(engine: Engine) -> list[ReconciliationRun]:
    with Session(engine) as session:
        return list(session.scalars(select(ReconciliationRun).order_by(ReconciliationRun.id)))


def test_nightly_reconciles_on_batch_while_critical_work_goes_on(
    committed: Engine,
    start_worker: Callable[..., Proc],
    simulator_server: Any,
    sim: Any,
) -> None:
    yesterday = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    yesterday -= timedelta(days=1)
    captured = {}
    for gateway, currency, status in (
        ("razorpay", "INR", "captured"),
        ("stripe", "usd", "succeeded"),
    ):
        gateway_id = sim.add_payment(
            gateway,
            amount=5_000,
            currency=currency,
            status=status,
            created=int(yesterday.timestamp()),
        )["id"]
        captured[gateway] = add_payment(committed, gateway, gateway_id, "PENDING", yesterday)
    # Slow pages: the run takes seconds, and holds the only process of the batch worker.
    sim.add_fault("*.payment*.list", "latency", latency_ms=100)
    batch = start_worker(queues="batch", concurrency=1, **env(simulator_server, sim))
    critical = start_worker(queues="critical,default", concurrency=1, **env(simulator_server, sim))

    app.send_task("reconciliation.nightly")
    wait_until(lambda: any(run.status == "RUNNING" for run in runs(committed)), timeout=30)
    with Session(committed) as session:
        hold = add_hold(session, datetime.now(UTC) - timedelta(seconds=1))
        session.commit()
    app.send_task("holds.expire", kwargs={"hold_id": hold})
    with Session(committed) as session:
        wait_until(
            lambda: session.get(BookingHold, hold, populate_existing=True).status == "EXPIRED",
            timeout=10,
        )
    assert any(run.status != "COMPLETED" for run in runs(committed))  # still reconciling

    # Webhooks go to `critical` too: one signed right, one forged.
    body = sim.webhook_event(
        "stripe",
        "payment_intent.succeeded",
        sim.add_payment("stripe", amount=100, currency="usd")["id"],
    )
    app.send_task(
        "webhooks.process",
        kwargs={
            "provider": "stripe",
            "body": body,
            "signature": sign_stripe(body, SECRETS["STRIPE_WEBHOOK_SECRET"]),
        },
    )
    forged = body.replace('"amount":100', '"amount":1')
    app.send_task(
        "webhooks.process",
        kwargs={
            "provider": "razorpay",
            "body": forged,
            "signature": sign_razorpay(body, SECRETS["RAZORPAY_WEBHOOK_SECRET"]),
        },
    )
    with Session(committed) as session:
        letter = wait_until(lambda: session.scalar(select(DeadLetter)), timeout=20)
        assert letter.task_name == "webhooks.process" and letter.classification == "PERMANENT"
        assert letter.error_type == "WebhookSignatureError"
        event = wait_until(lambda: session.scalar(select(WebhookEvent)), timeout=20)
        assert event.outcome == "unknown_payment"  # not one of ours: recorded, nothing moved

    wait_until(
        lambda: len(runs(committed)) == 2 and all(r.status == "COMPLETED" for r in runs(committed)),
        timeout=60,
    )
    with Session(committed) as session:
        assert {session.get(Payment, p).status for p in captured.values()} == {"COMPLETED"}
        nightly = session.scalar(select(JobRun).where(JobRun.job_name == "reconciliation.nightly"))
        assert nightly.outcome == "OK" and nightly.counts == {"gateways": 2, "runs": 2}
    assert "reconciliation.completed" in batch.output()
    log = critical.output()
    assert "webhook.signature_rejected" in log
    for secret in SECRETS.values():
        assert secret not in log and secret not in batch.output()
    assert forged not in log and '"amount":1,' not in log


def test_a_run_held_by_a_dead_worker_is_taken_over_when_its_lease_runs_out(
    committed: Engine,
    start_worker: Callable[..., Proc],
    simulator_server: Any,
    sim: Any,
) -> None:
    """A worker died holding a run; its message, delivered again, finds the lease held. It
    comes back when the lease runs out instead of saying `busy` and leaving the run to the
    next night's job."""
    from workers.db import session_scope
    from workers.reconciliation import open_run

    worker = start_worker(**env(simulator_server, sim), queues="batch")
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    with session_scope() as session:
        run_id = open_run(
            session, "razorpay", day - timedelta(days=1), day, now=datetime.now(UTC), actor="test"
        )
        session.get(ReconciliationRun, run_id).owner = "task:died"
        session.get(ReconciliationRun, run_id).lease_until = datetime.now(UTC) + timedelta(
            seconds=3
        )
    app.send_task("reconciliation.run", kwargs={"run_id": run_id})
    wait_until(lambda: runs(committed)[0].status == "COMPLETED", timeout=60)
    assert "task.deferred" in worker.output()
    assert runs(committed)[0].owner != "task:died"
