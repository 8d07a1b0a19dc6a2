"""Warm shutdown: SIGTERM during a batch makes the worker finish the refunds it has in hand and
hand back the rest; a new worker does them. Nothing is lost, nothing is sent twice."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from tests.conftest import wait_until
from tests.processes import Proc
from tests.tasks.test_refunds_worker import worker_env
from tests.workers.factories import add_refund
from workers.celery_app import app
from workers.db import session_scope
from workers.models import Refund

pytestmark = pytest.mark.e2e
N = 30


def completed() -> int:
    with session_scope() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(Refund).where(Refund.status == "COMPLETED")
            )
        )


def test_sigterm_finishes_what_it_holds_and_loses_nothing(
    committed: Engine, start_worker: Callable[..., Proc], simulator_server: Any, sim: Any
) -> None:
    env = worker_env(simulator_server)
    sim.add_fault("*.refund.create", "latency", latency_ms=300)
    ids = [add_refund(sim, "razorpay" if i % 2 else "stripe") for i in range(N)]
    first = start_worker(**env)
    for refund_id in ids:
        app.send_task("refunds.submit", kwargs={"refund_id": refund_id})
    wait_until(lambda: completed() >= 4, timeout=60)
    os.kill(first.popen.pid, signal.SIGTERM)  # to the main process, as a supervisor does
    assert first.popen.wait(timeout=60) == 0
    assert "warm shutdown" in first.output().lower()
    done_by_first = completed()
    assert 4 <= done_by_first < N  # it stopped in the middle of the batch
    start_worker(**env)
    wait_until(lambda: completed() == N, timeout=120)
    effects = sim.effects()
    assert effects["refunds_created"] == N and effects["duplicates"] == []
    creates = sim.stats()["requests"]
    assert creates["razorpay.refund.create"] + creates["stripe.refund.create"] == N
