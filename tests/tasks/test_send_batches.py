"""`notifications.send` received in batches (workers/messaging/batching.py), through a real
worker on Redis and PostgreSQL: a burst is written in a few transactions, each notification
once; what a batch cannot finish runs one by one as before; a worker killed with batches
waiting and running loses none of them."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from tests.conftest import wait_until
from tests.processes import Proc, RedisServer
from workers.celery_app import app
from workers.models import DeadLetter, Notification
from workers.observability.metrics import WorkerMetrics

pytestmark = pytest.mark.e2e

REFUSED = "refused@example.com"


def email(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "channel": "email",
        "recipient": f"guest{i}@example.com",
        "template": "message",
        "data": {"subject": f"Booking {i}", "body": "Court 3 at 18:00"},
        **extra,
    }


def publish(payloads: list[dict[str, Any]]) -> None:
    """All at once over one connection, as a service sending a burst does."""
    with app.producer_or_acquire() as producer:
        for kwargs in payloads:
            app.send_task("notifications.send", kwargs=kwargs, producer=producer)


def count(engine: Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar_one())


def batch_sizes(root: Path) -> dict[str, float]:
    """The worker's `backstop_task_batch_size` histogram for `notifications.send`: "count"
    (batches), "sum" (messages in them) and each cumulative bucket by its bound ("100.0")."""
    found = {"count": 0.0, "sum": 0.0}
    for metric in WorkerMetrics(root).collect():
        for sample in metric.samples:
            if sample.labels.get("task") != "notifications.send":
                continue
            part = sample.name.removeprefix("backstop_task_batch_size_")
            key = sample.labels["le"] if part == "bucket" else part
            if key in found or part == "bucket":
                found[key] = found.get(key, 0.0) + sample.value
    return found


def drained(client: redis_lib.Redis) -> bool:
    """Nothing queued and nothing taken but not acked."""
    return client.llen("notifications") == 0 and client.hlen("unacked") == 0


@contextlib.contextmanager
def trigger(engine: Engine, name: str, when: str, body: str) -> Iterator[Engine]:
    """A PL/pgSQL trigger on `notifications` for the block: the database misbehaving, for
    real. `when`: e.g. "BEFORE INSERT ... FOR EACH ROW"; `body`: the function's."""
    with engine.begin() as conn:
        conn.execute(
            text(
                f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ {body} $$; "
                f"CREATE TRIGGER {name} {when.replace('...', 'ON notifications')} "
                f"EXECUTE FUNCTION {name}()"
            )
        )
    try:
        yield engine
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TRIGGER {name} ON notifications"))
            conn.execute(text(f"DROP FUNCTION {name}()"))


@pytest.fixture
def refusing_database(committed: Engine) -> Iterator[Engine]:
    """PostgreSQL refuses a notification for REFUSED (a check a DBA added, say): a real
    database error in the middle of a batch's INSERT."""
    with trigger(
        committed,
        "refuse_one",
        "BEFORE INSERT ... FOR EACH ROW",
        f"""BEGIN
              IF NEW.recipient = '{REFUSED}' THEN
                RAISE EXCEPTION 'recipient refused' USING ERRCODE = 'check_violation';
              END IF;
              RETURN NEW;
            END""",
    ):
        yield committed


def test_a_burst_is_written_in_batches_each_notification_once_and_every_message_acked(
    committed: Engine,
    start_worker: Callable[..., Proc],
    smtp: Any,
    redis: redis_lib.Redis,
    tmp_path: Path,
) -> None:
    metrics = tmp_path / "metrics"
    worker = start_worker(
        NOTIFY_EMAIL_FROM="bookings@example.com",
        PROMETHEUS_MULTIPROC_DIR=str(metrics),
        **smtp.env(),
    )
    plain = [email(i) for i in range(300)]
    keyed = [email(1000 + i, dedupe_key=f"burst-{i}") for i in range(200)]
    again = [email(2000 + i, dedupe_key=f"burst-{i}") for i in range(0, 200, 4)]  # 50 twice
    invalid = [
        {**email(3000), "channel": "fax"},
        {**email(3001), "template": "no_such_template"},
        {key: value for key, value in email(3002).items() if key != "recipient"},
    ]
    burst = plain + keyed + again + invalid
    publish(burst)

    wait_until(lambda: count(committed, "SELECT count(*) FROM notifications") == 500, timeout=60)
    wait_until(lambda: drained(redis), timeout=60)
    wait_until(
        lambda: count(committed, "SELECT count(*) FROM notifications WHERE status = 'SENT'") == 500,
        timeout=60,
    )
    with Session(committed) as session:
        rows = session.execute(select(Notification.recipient, Notification.dedupe_key)).all()
        letters = session.scalars(select(DeadLetter)).all()
    # Each dedupe key once, with the first message's recipient; each plain message once.
    assert Counter(row.dedupe_key for row in rows if row.dedupe_key) == {
        f"burst-{i}": 1 for i in range(200)
    }
    assert {row.recipient for row in rows if row.dedupe_key} == {
        f"guest{1000 + i}@example.com" for i in range(200)
    }
    assert sorted(row.recipient for row in rows if not row.dedupe_key) == sorted(
        payload["recipient"] for payload in plain
    )
    # The invalid ones were left to the task itself: dead letters naming the field.
    assert (
        sorted(letter.error_message.split(":")[0] for letter in letters) == ["invalid payload"] * 3
    ), [letter.error_message for letter in letters]
    assert {letter.payload["recipient"] for letter in letters if "recipient" in letter.payload} == {
        "guest3000@example.com",
        "guest3001@example.com",
    }
    assert len(smtp.messages) == 500
    # Written in batches: fewer pool jobs than messages, every valid message in one of them.
    wait_until(lambda: batch_sizes(metrics)["sum"] == 550)
    jobs = batch_sizes(metrics)["count"]
    assert jobs < 550 / 2, f"{jobs:.0f} batches for 550 messages: no batching"
    assert "batch.unbatched" not in worker.output()


@pytest.fixture
def slow_database(committed: Engine) -> Iterator[Engine]:
    """Every INSERT into notifications takes 0.2 s longer (a database under load)."""
    with trigger(
        committed,
        "slow_insert",
        "BEFORE INSERT ... FOR EACH STATEMENT",
        "BEGIN PERFORM pg_sleep(0.2); RETURN NULL; END",
    ):
        yield committed


def test_batches_grow_with_a_slow_database_up_to_the_default_size_and_no_larger(
    slow_database: Engine,
    start_worker: Callable[..., Proc],
    smtp: Any,
    redis: redis_lib.Redis,
    tmp_path: Path,
) -> None:
    """A batch takes what arrived while the last one ran: with a quick database a few
    messages, with a slow one (0.2 s a statement) many, up to TASK_BATCH_MAX (default 100),
    never more. One message at a time would take 0.2 s each: 1,500 would take 5 minutes."""
    total = 1500
    metrics = tmp_path / "metrics"
    start_worker(
        NOTIFY_EMAIL_FROM="bookings@example.com",
        PROMETHEUS_MULTIPROC_DIR=str(metrics),
        **smtp.env(),
    )
    started = time.monotonic()
    publish([email(i, dedupe_key=f"slow-{i}") for i in range(total)])
    written = "SELECT count(*) FROM notifications"
    wait_until(lambda: count(slow_database, written) == total, 90)
    took = time.monotonic() - started
    wait_until(lambda: drained(redis), timeout=60)
    buckets = wait_until(lambda: (b := batch_sizes(metrics)) and b.get("+Inf", 0) > 0 and b)
    assert isinstance(buckets, dict)
    assert buckets["100.0"] == buckets["+Inf"], f"a batch larger than 100: {buckets}"
    full = buckets["+Inf"] - buckets["50.0"]
    assert full >= total / 100 / 2, f"few batches filled up: {buckets}"
    print(f"{total} sends through 0.2 s statements in {took:.1f} s; batch sizes {buckets}")


def test_a_batch_the_database_refuses_runs_again_one_by_one_and_only_the_bad_one_is_lost(
    refusing_database: Engine,
    start_worker: Callable[..., Proc],
    smtp: Any,
    redis: redis_lib.Redis,
) -> None:
    worker = start_worker(NOTIFY_EMAIL_FROM="bookings@example.com", **smtp.env())
    burst = [email(i, dedupe_key=f"refuse-{i}") for i in range(300)]
    burst[150] = {**burst[150], "recipient": REFUSED}
    publish(burst)

    def letters() -> list[DeadLetter]:
        with Session(refusing_database) as session:
            return list(session.scalars(select(DeadLetter)))

    wait_until(
        lambda: (
            count(refusing_database, "SELECT count(*) FROM notifications") == 299
            and letters()
            and drained(redis)
        ),
        timeout=90,
    )
    time.sleep(1)  # nothing more comes
    [letter] = letters()
    assert letter.task_name == "notifications.send"
    assert letter.payload["recipient"] == REFUSED
    assert letter.classification == "PERMANENT" and "recipient refused" in letter.error_message
    with Session(refusing_database) as session:
        keys = session.scalars(select(Notification.dedupe_key)).all()
    assert sorted(keys) == sorted(f"refuse-{i}" for i in range(300) if i != 150)
    # The refused batch ran again one message at a time; other batches went on as batches.
    assert "batch.unbatched" in worker.output()
    assert "notifications.send" in worker.output()


def dedupe_keys(raws: list[bytes]) -> set[str]:
    """The dedupe keys of the sends among task messages as Redis keeps them (queued, or
    unacked: [message, exchange, routing key]); the pumps' messages have none."""
    keys = set()
    for raw in raws:
        message = json.loads(raw)
        message = message[0] if isinstance(message, list) else message
        _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        if "dedupe_key" in kwargs:
            keys.add(str(kwargs["dedupe_key"]))
    return keys


def test_a_worker_killed_with_batches_waiting_and_running_loses_none_of_them(
    committed: Engine,
    start_worker: Callable[..., Proc],
    smtp: Any,
    redis: redis_lib.Redis,
) -> None:
    """Every message Redis still holds when the worker dies (queued, or taken and not acked:
    waiting for a batch, in one, or done but not acked) is written once after the restart.

    One message more may be lost, and the test says which: the one the consumer had popped
    (BRPOP) and not yet recorded as unacked (HSET) at the instant of the SIGKILL. That window
    is kombu's Redis transport, for every task (workers/messaging/redis_transport.py); it is
    not batching's, and it holds at most one message (the consumer pops one at a time)."""
    env = {
        "NOTIFY_EMAIL_FROM": "bookings@example.com",
        # Redis gives a killed worker's messages back after this.
        "BROKER_VISIBILITY_TIMEOUT_SECONDS": "12",
        "TASK_SOFT_TIME_LIMIT_SECONDS": "4",
        "TASK_TIME_LIMIT_SECONDS": "5",
        **smtp.env(),
    }
    total = 3000
    everything = {f"kill-{i}" for i in range(total)}
    worker = start_worker(**env)
    publish([email(i, dedupe_key=f"kill-{i}") for i in range(total)])
    written = "SELECT count(*) FROM notifications"
    wait_until(lambda: count(committed, written) >= 300, timeout=60, every=0.02)
    worker.stop(signal.SIGKILL)  # the whole process group: the consumer and its pool

    def keys_written() -> set[str]:
        with Session(committed) as session:
            return set(session.scalars(select(Notification.dedupe_key)))

    # Nothing consumes now: what Redis holds, and what was written, is fixed until the restart.
    at_kill = keys_written()
    held = dedupe_keys(redis.hvals("unacked"))
    queued = dedupe_keys(redis.lrange("notifications", 0, -1))
    assert len(at_kill) < total, "killed after the work was done: no test"
    assert held - at_kill, "no message taken and unfinished when the worker died: no test"
    in_the_window = everything - at_kill - held - queued
    assert len(in_the_window) <= 1, f"{len(in_the_window)} messages nowhere at the kill"

    start_worker(**env)
    expected = everything - in_the_window
    try:
        wait_until(lambda: keys_written() >= expected, timeout=120)
    except AssertionError:
        raise AssertionError(
            f"{len(expected - keys_written())} of the {len(held)} held and {len(queued)} "
            f"queued at the kill never written; {redis.llen('notifications')} queued, "
            f"{redis.hlen('unacked')} unacked now"
        ) from None
    wait_until(lambda: drained(redis), timeout=60)
    with Session(committed) as session:
        rows = session.scalar(select(func.count()).select_from(Notification))
    assert rows == len(keys_written())  # each once
    print(
        f"killed with {len(at_kill)} of {total} written, {len(held - at_kill)} held unfinished, "
        f"{len(queued)} queued; all written after the restart"
        + (f"; lost in kombu's BRPOP-HSET window: {in_the_window}" if in_the_window else "")
    )


def test_a_warm_shutdown_mid_burst_exits_cleanly_and_the_next_worker_writes_the_rest(
    committed: Engine,
    start_worker: Callable[..., Proc],
    smtp: Any,
    redis: redis_lib.Redis,
) -> None:
    env = {"NOTIFY_EMAIL_FROM": "bookings@example.com", **smtp.env()}
    total = 3000
    first = start_worker(**env)
    publish([email(i, dedupe_key=f"term-{i}") for i in range(total)])
    written = "SELECT count(*) FROM notifications"
    wait_until(lambda: count(committed, written) >= 300, timeout=60, every=0.02)
    os.kill(first.popen.pid, signal.SIGTERM)  # to the main process, as a supervisor does
    assert first.popen.wait(timeout=60) == 0
    assert "warm shutdown" in first.output().lower()
    at_stop = count(committed, written)
    assert at_stop < total, "stopped after the work was done: no test"

    start_worker(**env)
    wait_until(lambda: count(committed, written) == total, timeout=120)
    wait_until(lambda: drained(redis), timeout=60)
    with Session(committed) as session:
        keys = session.scalars(select(Notification.dedupe_key)).all()
    assert len(keys) == total and set(keys) == {f"term-{i}" for i in range(total)}
    assert "Traceback" not in first.output(), first.output()[-3000:]


def test_a_batch_no_process_took_before_the_broker_dropped_is_put_back_at_once(
    committed: Engine,
    start_worker: Callable[..., Proc],
    smtp: Any,
    broker: RedisServer,
) -> None:
    """A worker with one process, busy with a delivery pump that the database holds up: the
    next batch waits in the pool for it when Redis is killed. The pool drops such a job on the
    lost connection (and calls none of its callbacks): its messages must be put back with the
    others once Redis is back, not left unacked until the visibility timeout (2 hours)."""
    with trigger(
        committed,
        "slow_update",
        "BEFORE UPDATE ... FOR EACH STATEMENT",
        "BEGIN PERFORM pg_sleep(4); RETURN NULL; END",
    ):
        start_worker(
            "--prefetch-multiplier=1",  # as the Procfile's worker: a job goes to an idle process
            "-O",
            "fair",
            BROKER_URL=broker.url,
            NOTIFY_EMAIL_FROM="bookings@example.com",
            concurrency=1,
            **smtp.env(),
        )
        client = redis_lib.Redis.from_url(broker.url)
        with app.connection_for_write(broker.url) as conn:
            app.send_task("notifications.send", kwargs=email(0), connection=conn)
        pumping = (
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE state = 'active' AND query LIKE 'UPDATE notifications%'"
        )
        wait_until(lambda: count(committed, pumping) == 1, timeout=30, every=0.05)
        with app.connection_for_write(broker.url) as conn:
            for i in range(1, 21):
                app.send_task("notifications.send", kwargs=email(i), connection=conn)
        wait_until(lambda: client.llen("notifications") == 0, timeout=10, every=0.05)
        time.sleep(0.5)  # the first of them handed to the busy pool, the rest waiting for it
        broker.kill()
        time.sleep(1)
        broker.start()
    written = "SELECT count(*) FROM notifications"
    wait_until(lambda: count(committed, written) == 21, timeout=60)
    wait_until(lambda: drained(redis_lib.Redis.from_url(broker.url)), timeout=60)
