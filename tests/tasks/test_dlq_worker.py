"""Dead-letter replay end to end: real workers on the real Redis broker, the replay sent by the
`backstop dlq` command and by the `dlq.replay` task, the outcome reported back by the worker."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from tests.conftest import service_env, wait_until
from tests.processes import Proc
from tests.tasks.test_refunds_worker import worker_env
from tests.workers.factories import add_hold, add_refund
from workers.celery_app import app
from workers.db import session_scope
from workers.dead_letters import record_dead_letter
from workers.errors import Classification, TransientError
from workers.models import BookingHold, DeadLetter, DeadLetterEvent, Refund, StateTransition

pytestmark = pytest.mark.e2e


def now() -> datetime:
    return datetime.now(UTC)


def new_letter(task: str, payload: dict[str, Any], error: Exception | None = None) -> int:
    with session_scope() as session:
        return record_dead_letter(
            session,
            task_name=task,
            task_id="lost-1",
            payload=payload,
            error=error or TransientError("database busy"),
            attempts=9,
            classification=Classification.TRANSIENT,
            now=now(),
        )


def letter(letter_id: int) -> DeadLetter:
    with session_scope() as session:
        found = session.get(DeadLetter, letter_id)
        session.expunge(found)
        return found


def backstop(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env=service_env(BACKSTOP_ACTOR="ops:test"),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_backstop_dlq_replay_runs_the_task_and_the_worker_closes_the_letter(
    committed: Engine, start_worker: Callable[..., Proc]
) -> None:
    start_worker()
    with session_scope() as session:
        hold = add_hold(session, now() - timedelta(seconds=5))
    letter_id = new_letter("holds.expire", {"hold_id": hold})
    done = backstop("dlq", "replay", str(letter_id), "--reason", "database is back")
    assert done.returncode == 0, done.stderr
    assert f"{letter_id}  replayed" in done.stdout
    wait_until(lambda: letter(letter_id).status == "REPLAYED")
    with session_scope() as session:
        assert session.get(BookingHold, hold).status == "EXPIRED"
        history = session.execute(
            select(StateTransition.to_status, StateTransition.actor, StateTransition.reason)
            .where(StateTransition.entity == "dead_letters", StateTransition.entity_id == letter_id)
            .order_by(StateTransition.id)
        ).all()
    assert [(to, actor) for to, actor, _ in history] == [
        ("RETRYING", "ops:test"),
        ("REPLAYED", "worker"),
    ]
    assert history[0][2] == "database is back"
    # Replaying it again does nothing: it is closed.
    again = backstop("dlq", "replay", str(letter_id), "--json")
    assert '"outcome": "skipped"' in again.stdout


def test_dlq_replay_from_the_task_api_survives_a_retry_and_reports_back_once(
    committed: Engine,
    start_worker: Callable[..., Proc],
    simulator_server: Any,
    sim: Any,
) -> None:
    start_worker(**worker_env(simulator_server))
    refund_id = add_refund(sim, "stripe")
    letter_id = new_letter("refunds.submit", {"refund_id": refund_id})
    sim.add_fault("stripe.refund.create", "503", remaining=1)  # the replay is retried once
    app.send_task("dlq.replay", kwargs={"dead_letter_id": letter_id, "actor": "flower:ops"})
    wait_until(lambda: letter(letter_id).status == "REPLAYED", timeout=60)
    with session_scope() as session:
        assert session.get(Refund, refund_id).status == "COMPLETED"
        events = session.scalars(select(DeadLetterEvent.action).order_by(DeadLetterEvent.id)).all()
        assert session.scalar(select(func.count()).select_from(DeadLetter)) == 1
    assert events == ["replayed", "replay_succeeded"]
    assert sim.effects()["refunds_created"] == 1


def test_a_replay_that_fails_again_is_recorded_on_the_same_letter(
    committed: Engine, start_worker: Callable[..., Proc]
) -> None:
    start_worker()  # no gateway credentials: the replayed submission fails permanently
    with session_scope() as session:
        from tests.workers.factories import CURRENCY
        from workers.models import Payment

        payment = Payment(
            gateway="razorpay",
            gateway_payment_id="pay_x1",
            amount=100,
            currency=CURRENCY["razorpay"],
        )
        session.add(payment)
        session.flush()
        refund = Refund(payment_id=payment.id, amount=100, currency=CURRENCY["razorpay"])
        session.add(refund)
        session.flush()
        refund_id = refund.id
    letter_id = new_letter("refunds.submit", {"refund_id": refund_id})
    app.send_task("dlq.replay", kwargs={"dead_letter_id": letter_id, "actor": "flower:ops"})
    failed = wait_until(
        lambda: (found := letter(letter_id)).status == "NEW" and found.replays == 1 and found
    )
    assert failed.error_type == "GatewayPermanent" and "not configured" in failed.error_message
    assert failed.classification == "PERMANENT"
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(DeadLetter)) == 1


def test_scheduled_triage_replays_through_dispatch_and_the_letter_closes(
    committed: Engine, start_worker: Callable[..., Proc]
) -> None:
    from workers.models import JobRun

    start_worker()
    with session_scope() as session:
        hold = add_hold(session, now() - timedelta(seconds=5))
    letter_id = new_letter("holds.expire", {"hold_id": hold})
    app.send_task("dlq.triage")  # as beat sends it
    wait_until(lambda: letter(letter_id).status == "REPLAYED")
    with session_scope() as session:
        assert session.get(BookingHold, hold).status == "EXPIRED"
        run = session.scalars(select(JobRun).where(JobRun.job_name == "dlq.triage")).one()
        assert run.counts["replayed"] == 1 and run.outcome == "OK"
