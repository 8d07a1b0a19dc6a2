"""Refunds end to end: `refunds.submit` sent by name to a real worker on Redis, the worker's
official SDK talking HTTP to the simulator, a transient fault retried with backoff."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.conftest import wait_until
from tests.processes import Proc
from tests.workers.factories import add_refund
from workers.celery_app import app
from workers.db import Steps, session_scope
from workers.models import Refund

pytestmark = pytest.mark.e2e


def worker_env(server: Any) -> dict[str, str]:
    return {
        **server.gateway_env(),
        "GATEWAY_TIMEOUT_SECONDS": "1",
        "TASK_RETRY_BASE_SECONDS": "0.3",
    }


def status(refund_id: int) -> str:
    with session_scope() as session:
        return session.get(Refund, refund_id).status


def test_refunds_submit_by_name_survives_transient_faults_and_is_made_once(
    committed: Engine, start_worker: Callable[..., Proc], simulator_server: Any, sim: Any
) -> None:
    worker = start_worker(**worker_env(simulator_server))
    rzp = add_refund(sim, "razorpay")
    stp = add_refund(sim, "stripe")
    # Each gateway fails the first two submissions: one refused, one lost after the effect.
    sim.add_fault("razorpay.refund.create", "503", remaining=1)
    sim.add_fault("stripe.refund.create", "lost", hang_seconds=2, remaining=1)
    sim.add_fault("*.refund.create", "502", remaining=1)
    for refund_id in (rzp, stp):
        app.send_task("refunds.submit", kwargs={"refund_id": refund_id})
    wait_until(lambda: status(rzp) == status(stp) == "COMPLETED", timeout=60)
    effects = sim.effects()
    assert effects["refunds_created"] == 2 and effects["duplicates"] == []
    assert worker.output().count("task.retry") >= 2


def test_an_open_breaker_defers_the_task_without_spending_a_retry(
    committed: Engine,
    start_worker: Callable[..., Proc],
    simulator_server: Any,
    sim: Any,
    redis: Any,
) -> None:
    from workers.gateways.breaker import make_breaker

    worker = start_worker(**worker_env(simulator_server), BREAKER_RESET_SECONDS="3")
    make_breaker("stripe", fail_max=5, reset_seconds=3, redis=redis).open()  # shared state
    refund_id = add_refund(sim, "stripe")
    app.send_task("refunds.submit", kwargs={"refund_id": refund_id})
    wait_until(lambda: status(refund_id) == "COMPLETED", timeout=30)
    log = worker.output()
    assert "task.deferred" in log and "task.retry" not in log
    assert sim.stats()["requests"]["stripe.refund.create"] == 1


def test_a_chunk_of_rechecks_retries_only_the_refunds_that_got_no_answer(
    committed: Engine,
    start_worker: Callable[..., Proc],
    simulator_server: Any,
    sim: Any,
    gateways: dict[str, Any],
) -> None:
    from datetime import timedelta

    from workers.base import utcnow
    from workers.refunds.submission import submit_refund

    worker = start_worker(**worker_env(simulator_server))
    ids = []
    for name in ["razorpay", "stripe"] * 4:
        sim.set_refund_outcome(name, "pending")
        refund_id = add_refund(sim, name)
        with session_scope() as session:
            outcome = submit_refund(
                Steps(session), refund_id, utcnow, gateways.__getitem__, lease=timedelta(seconds=30)
            )
        assert outcome == "PROCESSING"
        with session_scope() as session:
            gateway_refund_id = session.get(Refund, refund_id).gateway_refund_id
        sim.settle_refund(gateway_refund_id, "processed" if name == "razorpay" else "succeeded")
        ids.append(refund_id)
    sim.add_fault("stripe.refund.fetch", "503", remaining=2)
    app.send_task("refunds.check_many", kwargs={"refund_ids": ids})
    wait_until(lambda: all(status(refund_id) == "COMPLETED" for refund_id in ids), timeout=60)
    assert "task.retry" in worker.output()
    requests = sim.stats()["requests"]
    # Every refund asked once, and only the two that got a 503 asked again.
    assert requests["razorpay.refund.fetch"] == 4
    assert requests["stripe.refund.fetch"] == 4 + 2
