"""The broker crashes under load: a private redis-server (AOF, as production runs it) is
SIGKILLed and started again, again and again, while tasks are sent by name at a steady rate.
The worker must outlive every crash, consume again soon after each restart, and lose nothing
the broker accepted."""

from __future__ import annotations

import base64
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from tests.conftest import wait_until
from tests.processes import Proc, RedisServer, Sender
from tests.workers.factories import add_holds
from workers.celery_app import app
from workers.models import BookingHold, Notification

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CRASHES = 20
RECOVERY_SECONDS = 30  # the target: consuming again within this of each restart


def expired(engine: Engine, holds: list[int]) -> int:
    with Session(engine) as session:
        return int(
            session.scalar(
                select(func.count()).where(
                    BookingHold.id.in_(holds), BookingHold.status == "EXPIRED"
                )
            )
        )


def test_a_worker_outlives_twenty_redis_crashes_and_loses_nothing_accepted(
    committed: Engine, start_worker: Callable[..., Proc], broker: RedisServer
) -> None:
    due = datetime.now(UTC) - timedelta(seconds=1)
    with Session(committed) as session:
        holds = add_holds(session, [due] * 4000)
        probes = add_holds(session, [due] * CRASHES)
        session.commit()
    # No beat runs: no sweep expires a hold whose task was lost.
    worker = start_worker(BROKER_URL=broker.url, queues="critical")
    sender = Sender(broker.url, "holds.expire", [{"hold_id": h} for h in holds], rate=40)
    sender.start()
    recoveries: list[float] = []
    try:
        for crash in range(CRASHES):
            time.sleep(2)
            broker.kill()
            time.sleep(1)
            broker.start()
            back = time.monotonic()
            probe = probes[crash]
            with Connection(broker.url) as conn:
                app.send_task("holds.expire", kwargs={"hold_id": probe}, connection=conn)
            wait_until(
                lambda probe=probe: expired(committed, [probe]) == 1,
                timeout=RECOVERY_SECONDS,
                every=0.2,
            )
            recoveries.append(time.monotonic() - back)
            assert worker.popen.poll() is None, f"the worker died at crash {crash + 1}"
    finally:
        sender.stop.set()
        sender.join()
    accepted = [payload["hold_id"] for payload in sender.accepted]
    try:
        wait_until(lambda: expired(committed, accepted) == len(accepted), timeout=120)
    except AssertionError:
        raise AssertionError(where_are(committed, broker, accepted)) from None
    print(
        f"{CRASHES} crashes: consuming again after {max(recoveries):.1f} s at worst "
        f"(median {sorted(recoveries)[len(recoveries) // 2]:.1f} s); "
        f"{len(accepted)} accepted, {sender.refused} refused while Redis was down"
    )
    assert "Unrecoverable error" not in worker.output()


def where_are(engine: Engine, broker: RedisServer, holds: list[int]) -> str:
    """Where the tasks of the holds not expired are: queued, unacked, or nowhere."""
    with Session(engine) as session:
        done = set(
            session.scalars(
                select(BookingHold.id).where(
                    BookingHold.id.in_(holds), BookingHold.status == "EXPIRED"
                )
            )
        )
    missing = set(holds) - done

    def hold_of(message: dict[str, Any]) -> Any:
        return json.loads(base64.b64decode(message["body"]))[1].get("hold_id")

    client = redis.Redis.from_url(broker.url)
    queued = {hold_of(json.loads(raw)) for raw in client.lrange("critical", 0, -1)}
    unacked = {hold_of(json.loads(raw)[0]) for raw in client.hvals("unacked")}
    return (
        f"{len(missing)} of {len(holds)} accepted holds not expired: "
        f"{len(missing & queued)} still queued, {len(missing & unacked)} unacked, "
        f"{len(missing - queued - unacked)} nowhere in Redis (e.g. {sorted(missing)[:5]})"
    )


def test_a_redis_crash_mid_burst_delays_no_notification_long_and_sends_few_twice(
    committed: Engine,
    start_worker: Callable[..., Proc],
    broker: RedisServer,
    smtp: Any,
    tmp_path: Path,
) -> None:
    """Emails sent by name at 150/s; Redis SIGKILLed after a third of them and started again
    3 s later. With the default NOTIFY_TIMEOUT_SECONDS and batch size (only the outbox sweep
    shortened, to 10 s / 5 s): every accepted notification is SENT within 2 minutes of Redis
    coming back, and what reached the SMTP server twice is at most what was in flight."""
    total = 1500
    start_worker(
        "--beat",
        f"--schedule={tmp_path / 'beat-schedule'}",
        BROKER_URL=broker.url,
        NOTIFY_OUTBOX_SWEEP_SECONDS="10",
        NOTIFY_OUTBOX_AFTER_SECONDS="5",
        NOTIFY_EMAIL_FROM="bookings@example.com",
        **smtp.env(),
    )
    payloads = [
        {
            "channel": "email",
            "recipient": f"guest{i}@example.com",
            "template": "booking_confirmed",
            "data": {"resource_id": f"court-{i % 4}", "start_time": "18:00"},
            "dedupe_key": f"burst-{i}",
        }
        for i in range(total)
    ]
    sender = Sender(broker.url, "notifications.send", payloads, rate=150)
    sender.start()
    wait_until(lambda: len(sender.accepted) >= total // 3, timeout=60)
    broker.kill()
    time.sleep(3)
    broker.start()
    back = time.monotonic()
    sender.join(timeout=120)
    keys = [payload["dedupe_key"] for payload in sender.accepted]

    def sent() -> int:
        with Session(committed) as session:
            return int(
                session.scalar(
                    select(func.count()).where(
                        Notification.dedupe_key.in_(keys), Notification.status == "SENT"
                    )
                )
            )

    try:
        wait_until(lambda: sent() == len(keys), timeout=150, every=1)
    except AssertionError:
        raise AssertionError(not_sent(committed, broker, keys)) from None
    took = time.monotonic() - back
    ids = Counter(message["Message-ID"] for message in smtp.messages)
    twice = sum(count - 1 for count in ids.values() if count > 1)
    print(
        f"{len(keys)} accepted ({sender.refused} refused while Redis was down): all SENT "
        f"{took:.0f} s after Redis came back; {twice} delivered twice"
    )
    assert took <= 120
    assert twice <= 50  # one pump's batch, at most, was in flight at the crash


def not_sent(engine: Engine, broker: RedisServer, keys: list[str]) -> str:
    """Where the accepted notifications not SENT are: a row in which status, or their message
    queued, unacked, or nowhere."""
    with Session(engine) as session:
        rows = dict(
            session.execute(
                select(Notification.dedupe_key, Notification.status).where(
                    Notification.dedupe_key.in_(keys)
                )
            ).all()
        )
    missing = {key for key in keys if rows.get(key) != "SENT"}

    def key_of(raw: bytes) -> Any:
        message = json.loads(raw)
        message = message[0] if isinstance(message, list) else message
        return json.loads(base64.b64decode(message["body"]))[1].get("dedupe_key")

    client = redis.Redis.from_url(broker.url)
    queued = {key_of(raw) for raw in client.lrange("notifications", 0, -1)}
    unacked = {key_of(raw) for raw in client.hvals("unacked")}
    statuses = Counter(rows.get(key, "no row") for key in missing)
    return (
        f"{len(missing)} of {len(keys)} accepted not SENT: {dict(statuses)}; their messages: "
        f"{len(missing & queued)} queued, {len(missing & unacked)} unacked, "
        f"{len(missing - queued - unacked)} nowhere in Redis (e.g. {sorted(missing)[:5]})"
    )


def test_a_task_running_when_the_connection_drops_runs_once(
    committed: Engine, start_worker: Callable[..., Proc], broker: RedisServer
) -> None:
    """Redis stays up but drops every client (a network blip, a proxy reset). The worker
    reconnects; the task it was running goes on and is not also put back on its queue for a
    second worker process to run at the same time."""
    worker = start_worker(
        "-I", "tests.observe_tasks", BROKER_URL=broker.url, queues="default", concurrency=2
    )
    client = redis.Redis.from_url(broker.url)
    app.send_task(
        "observe.long",
        kwargs={"token": "blip", "failures": 6},
        queue="default",
        connection=Connection(broker.url),
    )
    wait_until(lambda: client.get("observe:blip") == b"1", timeout=30)
    client.client_kill_filter(_type="normal", skipme=True)
    wait_until(lambda: "Connection to broker lost" in worker.output(), timeout=30)
    wait_until(lambda: re.search(r"observe\.long\[[0-9a-f-]+\] succeeded", worker.output()), 30)
    time.sleep(3)  # a second run, if there were one, would have started by now
    assert client.get("observe:blip") == b"1"
    assert client.hlen("unacked") == 0  # acked over a new connection
    assert worker.popen.poll() is None and "Unrecoverable error" not in worker.output()
