"""The refund guarantee under crashes: a real worker is SIGKILLed three times while 500
refunds are submitted and the simulator fails over 20% of refund calls, lost responses among
them. Afterwards every refund is final, none was made twice at the gateway, none was lost.

Redis alone does not promise the last part: a message a worker has popped but not yet
recorded as unacked dies with a SIGKILLed worker. What finds that work again is the refund
retry job, which resends PENDING refunds whose submission never finished; so the last worker
runs beat too, as a deployment does, with the job every minute."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, func, insert, select

from tests.processes import Proc
from tests.tasks.test_refunds_worker import worker_env
from tests.workers.factories import CAPTURED, CURRENCY
from workers.celery_app import app
from workers.db import session_scope
from workers.models import DeadLetter, JobRun, Payment, Refund

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REFUNDS = 500
KILLS = 3


def add_refunds(sim: Any) -> list[int]:
    rows_by_gateway = {}
    for gateway in CURRENCY:
        ids = sim.add_payments(
            gateway,
            [
                {"amount": 10_000, "currency": CURRENCY[gateway], "status": CAPTURED[gateway]}
                for _ in range(REFUNDS // 2)
            ],
        )
        rows_by_gateway[gateway] = ids
    with session_scope() as session:
        payments = session.execute(
            insert(Payment).returning(Payment.id, Payment.currency),
            [
                {
                    "gateway": gateway,
                    "gateway_payment_id": gateway_id,
                    "amount": 10_000,
                    "currency": CURRENCY[gateway],
                    "status": "COMPLETED",
                }
                for gateway, ids in rows_by_gateway.items()
                for gateway_id in ids
            ],
        ).all()
        return list(
            session.execute(
                insert(Refund).returning(Refund.id),
                [
                    {"payment_id": payment_id, "amount": 1_000 + payment_id, "currency": currency}
                    for payment_id, currency in payments
                ],
            ).scalars()
        )


def where_are(redis: Any, refund_ids: list[int]) -> dict[int, list[str]]:
    """Where the broker holds a message for each refund: a queue list or the unacked hash."""
    found: dict[int, list[str]] = {refund_id: [] for refund_id in refund_ids}
    places = [
        (f"queue {key.decode()}", item)
        for key in redis.keys("*")
        if redis.type(key) == b"list"
        for item in redis.lrange(key, 0, -1)
    ]
    places += [("unacked", item) for item in redis.hvals("unacked")]
    for place, item in places:
        for refund_id in refund_ids:
            if f'"refund_id": {refund_id}}}'.encode() in base64_bodies(item):
                found[refund_id].append(place)
    return found


def base64_bodies(item: bytes) -> bytes:
    import base64

    text = item.decode(errors="replace")
    start = text.find('"body": "')
    if start < 0:
        return item
    body = text[start + 9 : text.index('"', start + 9)]
    return base64.b64decode(body) + item


def statuses() -> dict[str, int]:
    with session_scope() as session:
        return dict(
            session.execute(select(Refund.status, func.count()).group_by(Refund.status)).all()
        )


def test_sigkilled_workers_lose_nothing_and_refund_nothing_twice(
    committed: Engine,
    start_worker: Callable[..., Proc],
    simulator_server: Any,
    sim: Any,
    redis: Any,
    tmp_path: Any,
) -> None:
    refund_ids = add_refunds(sim)
    for kind, rate in (("lost", 0.10), ("503", 0.06), ("429", 0.04), ("timeout", 0.04)):
        sim.add_fault("*.refund.create", kind, rate=rate, hang_seconds=1.5)
    sim.add_fault("*.refund.create", "latency", latency_ms=20)
    env = {
        **worker_env(simulator_server),
        "TASK_RETRY_MAX_SECONDS": "2",
        "TASK_MAX_RETRIES": "50",
        # Redis gives a killed worker's messages back after this; a countdown and a run
        # must fit inside it, so the time limits shrink with it.
        "BROKER_VISIBILITY_TIMEOUT_SECONDS": "12",
        "TASK_SOFT_TIME_LIMIT_SECONDS": "4",
        "TASK_TIME_LIMIT_SECONDS": "5",
        # At this fault rate the breakers open now and then; a short reset keeps it brisk.
        "BREAKER_RESET_SECONDS": "3",
    }

    def start(*extra: str) -> Proc:
        return start_worker(*extra, queues="critical", concurrency=4, **env)

    worker = start()
    for refund_id in refund_ids:
        app.send_task("refunds.submit", kwargs={"refund_id": refund_id})
    for kill in range(KILLS):
        time.sleep(3)
        assert statuses().get("PENDING", 0) > 0, "killed after the work was done: no test"
        worker.stop(signal.SIGKILL)  # the whole process group: the parent and its children
        if kill < KILLS - 1:
            worker = start()
    env.update(REFUND_RETRY_CRON="* * * * *", REFUND_PENDING_AFTER_SECONDS="15")
    worker = start("--beat", f"--schedule={tmp_path / 'beat-schedule'}")

    deadline = time.monotonic() + 300
    while statuses() != {"COMPLETED": REFUNDS}:
        if time.monotonic() > deadline:
            with session_scope() as session:
                letters = session.execute(select(DeadLetter.error_message)).scalars().all()
                stuck = session.execute(
                    select(Refund.id, Refund.status, Refund.last_error, Refund.in_flight_until)
                    .where(Refund.status != "COMPLETED")
                    .limit(5)
                ).all()
            raise AssertionError(
                f"not all completed: {statuses()}; stuck {stuck}; "
                f"dead letters {letters[:5]}; messages for them: "
                f"{where_are(redis, [row.id for row in stuck])}"
            )
        time.sleep(1)
    effects = sim.effects()
    assert effects["duplicates"] == [], "a refund was made twice at the gateway"
    assert effects["refunds_created"] == REFUNDS, "a refund was lost or made twice"
    with session_scope() as session:
        rows = session.execute(
            select(Refund.id, Refund.gateway_refund_id, Refund.idempotency_key)
        ).all()
        assert session.scalar(select(func.count()).select_from(DeadLetter)) == 0
    assert len({row.gateway_refund_id for row in rows}) == REFUNDS
    by_key = effects["by_idempotency_key"]
    assert all(by_key.get(row.idempotency_key) == 1 for row in rows)
    with session_scope() as session:
        rescued = session.scalars(
            select(JobRun.counts).where(JobRun.job_name == "refunds.retry_stuck")
        ).all()
    print(f"refunds resent by the retry job: {sum(c.get('resubmitted', 0) for c in rescued)}")
    injected = sim.stats()["faults_injected"]
    assert injected.get("lost", 0) >= 20 and sum(injected.values()) >= REFUNDS * 0.2
