"""Notification throughput: delivered notifications/s through a real worker, against a no-op
Celery task through the same worker in the same run, on a real PostgreSQL and Redis.

One worker is started as the Procfile's `worker` line starts it (prefork, concurrency = CPU
count, prefetch 1, -O fair, queues critical,default,notifications) and runs, in alternating
rounds (3 in a full run, 1 in a quick one):

1. no-op: N `celery.accumulate` tasks (Celery's own task that returns its arguments) sent to
   the `notifications` queue; done when the worker has finished all N.
2. notifications: N `notifications.send` tasks sent by name with a payload, as other services
   send them (email, the `message` template, half with a dedupe key); the worker receives them
   in batches (workers/messaging/batching.py), writes the rows and asks for a delivery pump,
   which claims them, sends each email over SMTP to a local server (aiosmtpd, in this process)
   and records SENT. Done when all N rows are SENT.

then delivery alone once: N rows written in one statement, one `notifications.deliver_due`.
The same rounds run again through a worker started with TASK_BATCH_MAX=1: every send a task
run of its own, the form batching replaced, against its own no-op rounds.

Each phase is timed from its first message sent to its last one done; the messages are sent
from this process in one loop at the start of the phase. Figures are medians over the rounds.
Target: notifications/s >= 0.8 x the no-op's tasks/s. The SMTP server must have received
exactly one email per notification, in every round.

    .venv/bin/python -m tests.services -- .venv/bin/python bench/notifications.py [--quick] [--json]

`--quick` shrinks N and the rounds for a smoke run; `--json` also prints the results as one
JSON object on the last line. A missed target prints FAIL but the exit code stays 0: this is a
measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the shared process helpers live in tests/

from bench.common import machine, scalar, service_urls, settle, verdict  # noqa: E402
from tests import processes  # noqa: E402
from tests.processes import Proc  # noqa: E402
from tests.smtp_sink import SmtpSink  # noqa: E402

TARGET_RATIO = 0.8
CPUS = os.cpu_count() or 1
FULL, QUICK = 5_000, 500
ROUNDS, QUICK_ROUNDS = 3, 1
TIMEOUT = 600.0
NOOP = "celery.accumulate"


def scalar_row(engine: Engine, sql: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(sql)).one()


def reset(engine: Engine, broker: redis.Redis) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE notification_attempts, notifications, dead_letters, state_transitions "
                "RESTART IDENTITY CASCADE"
            )
        )
    settle(engine, "notifications, state_transitions")
    broker.flushdb()


def start_worker(env: dict[str, str], logs: Path, name: str = "bench-notify") -> Proc:
    return processes.worker(
        name,
        env,
        logs / f"{name}.log",
        "--prefetch-multiplier=1",
        "-O",
        "fair",
        queues="critical,default,notifications",
        concurrency=CPUS,
    )


def publish(messages: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> None:
    """Send every message over one producer connection."""
    from workers.celery_app import app

    with app.producer_or_acquire() as producer:
        for name, kwargs, options in messages:
            app.send_task(name, kwargs=kwargs, producer=producer, **options)


def cpu_times() -> tuple[int, int]:
    """The machine's CPU time so far, and the idle part of it (jiffies, from /proc/stat)."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    return sum(values), values[3] + values[4]


def busy_since(before: tuple[int, int]) -> float:
    total, idle = cpu_times()
    spent = total - before[0]
    return round(1 - (idle - before[1]) / spent, 3) if spent else 0.0


def wait(done: Any, n: int, started: float) -> tuple[int, float]:
    deadline = time.monotonic() + TIMEOUT
    count = 0
    while time.monotonic() < deadline:
        count = done()
        if count >= n:
            break
        time.sleep(0.05)
    return count, time.perf_counter() - started


def run_noop(worker: Proc, n: int) -> dict[str, Any]:
    before = worker.output().count(f"Task {NOOP}[")
    cpu = cpu_times()
    started = time.perf_counter()
    publish([(NOOP, {}, {"queue": "notifications"}) for _ in range(n)])

    def finished() -> int:
        log = worker.output()
        return log.count(f"Task {NOOP}[") - before

    count, seconds = wait(finished, n, started)
    return {
        "tasks": count,
        "seconds": round(seconds, 3),
        "per_s": round(count / seconds, 1),
        "cpu_busy": busy_since(cpu),
    }


def clear_notifications(engine: Engine, broker: redis.Redis) -> None:
    """Between rounds: what the last round left done, gone (its pumps finished first)."""
    drain(broker)
    with engine.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE notification_attempts, notifications, state_transitions RESTART IDENTITY"
            )
        )
    settle(engine, "notifications, notification_attempts, state_transitions")


def run_notifications(
    engine: Engine, broker: redis.Redis, sink: SmtpSink, n: int
) -> dict[str, Any]:
    clear_notifications(engine, broker)
    received_before = len(sink.messages)
    messages = []
    for i in range(n):
        kwargs: dict[str, Any] = {
            "channel": "email",
            "recipient": f"guest{i}@example.com",
            "template": "message",
            "data": {"subject": f"Booking {i}", "body": "Your court is booked for 18:00."},
        }
        if i % 2:
            kwargs["dedupe_key"] = f"bench-{time.time_ns()}-{i}"
        messages.append(("notifications.send", kwargs, {}))
    persisted: list[float] = []

    def sent_count() -> int:
        stored, sent = (
            int(v)
            for v in scalar_row(
                engine,
                "SELECT count(*), count(*) FILTER (WHERE status = 'SENT') FROM notifications",
            )
        )
        if stored >= n and not persisted:  # every send task has run (its row committed)
            persisted.append(time.perf_counter() - started)
        return sent

    cpu = cpu_times()
    started = time.perf_counter()
    publish(messages)
    count, seconds = wait(sent_count, n, started)
    received = len(sink.messages) - received_before
    attempts = int(scalar(engine, "SELECT count(*) FROM notification_attempts"))
    persist_s = persisted[0] if persisted else seconds
    return {
        "notifications": count,
        "seconds": round(seconds, 3),
        "per_s": round(count / seconds, 1),
        "cpu_busy": busy_since(cpu),
        "persisted_s": round(persist_s, 3),
        "persisted_per_s": round(n / persist_s, 1),
        "emails_received": received,
        "attempts": attempts,
        "dead": int(scalar(engine, "SELECT count(*) FROM notifications WHERE status = 'DEAD'")),
    }


WRITE_SQL = """
INSERT INTO notifications (channel, recipient, template, data)
SELECT 'email', 'guest' || n || '@example.com', 'message',
       jsonb_build_object('subject', 'Booking ' || n, 'body', 'Your court is booked for 18:00.')
FROM generate_series(1, :n) AS n
"""


def drain(broker: redis.Redis) -> None:
    """Wait until no message of the last phase is left (a pump the last sends asked for may
    still be queued), and for running tasks to finish, so none of them takes this phase's
    rows before the clock starts."""
    deadline = time.monotonic() + 60
    while broker.llen("notifications") and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2)


def run_delivery(engine: Engine, broker: redis.Redis, sink: SmtpSink, n: int) -> dict[str, Any]:
    """N notifications written in one statement, as another service (or a sweep of alerts)
    writes them, then one `notifications.deliver_due` sent by name: delivery alone."""
    clear_notifications(engine, broker)
    received_before = len(sink.messages)
    with engine.begin() as conn:
        conn.execute(text(WRITE_SQL), {"n": n})
    cpu = cpu_times()
    started = time.perf_counter()
    publish([("notifications.deliver_due", {}, {})])
    count, seconds = wait(
        lambda: int(scalar(engine, "SELECT count(*) FROM notifications WHERE status = 'SENT'")),
        n,
        started,
    )
    return {
        "notifications": count,
        "seconds": round(seconds, 3),
        "per_s": round(count / seconds, 1),
        "cpu_busy": busy_since(cpu),
        "emails_received": len(sink.messages) - received_before,
    }


def median(runs: list[dict[str, Any]], key: str = "per_s") -> float:
    return round(statistics.median(run[key] for run in runs), 1)


def batch_sizes(root: Path) -> dict[str, float]:
    """The worker's `backstop_task_batch_size` histogram for notifications.send: batches,
    messages in them, and the cumulative count of batches at each bucket's bound."""
    from workers.observability.metrics import WorkerMetrics

    found: dict[str, float] = {"count": 0.0, "sum": 0.0}
    for metric in WorkerMetrics(root).collect():
        for sample in metric.samples:
            if sample.labels.get("task") != "notifications.send":
                continue
            part = sample.name.removeprefix("backstop_task_batch_size_")
            key = f"le {sample.labels['le']}" if part == "bucket" else part
            found[key] = found.get(key, 0.0) + sample.value
    return found


def rounds_through(
    worker: Proc, engine: Engine, broker: redis.Redis, sink: SmtpSink, n: int, rounds: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Alternating rounds of no-op tasks and notifications through one worker."""
    noops, sends = [], []
    for index in range(rounds):
        print(f"  round {index + 1}: no-op ...", flush=True)
        noops.append(run_noop(worker, n))
        print(f"  round {index + 1}: notifications ...", flush=True)
        sends.append(run_notifications(engine, broker, sink, n))
    return noops, sends


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()
    urls = service_urls()
    if urls is None:
        return 2
    url, broker_url = urls
    n = QUICK if args.quick else FULL
    rounds = QUICK_ROUNDS if args.quick else ROUNDS

    with SmtpSink() as sink, tempfile.TemporaryDirectory(prefix="backstop-bench-") as folder:
        metrics = Path(folder) / "metrics"
        env = {
            **os.environ,
            **sink.env(),
            "NOTIFY_EMAIL_FROM": "bookings@example.com",
            "PYTHONUNBUFFERED": "1",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics),
        }
        os.environ.update(env)  # this process sends with the same settings
        from workers.db import get_engine
        from workers.db.migrate import upgrade

        upgrade(url)
        engine = get_engine()
        broker = redis.Redis.from_url(broker_url)
        print(f"backstop notification bench ({'quick' if args.quick else 'full'})")
        results: dict[str, Any] = {"mode": "quick" if args.quick else "full", "n": n}
        results["machine"] = machine(engine, broker)
        print(
            f"\n{n:,} notifications (email over SMTP to aiosmtpd in this process) against "
            f"{n:,} no-op tasks, {rounds} alternating round(s),\nthrough one worker: prefork "
            f"-c {CPUS}, prefetch 1, -O fair; then again with TASK_BATCH_MAX=1"
        )
        reset(engine, broker)
        worker = start_worker(env, Path(folder))
        try:
            noops, sends = rounds_through(worker, engine, broker, sink, n, rounds)
            print("  delivery of notifications already written ...", flush=True)
            delivery = run_delivery(engine, broker, sink, n)
            drain(broker)
            sizes = batch_sizes(metrics)
        finally:
            worker.stop()
        broker.flushdb()
        single_env = {**env, "TASK_BATCH_MAX": "1"}
        worker = start_worker(single_env, Path(folder), "bench-notify-single")
        try:
            print("  one task per send (TASK_BATCH_MAX=1):", flush=True)
            single_noops, singles = rounds_through(worker, engine, broker, sink, n, rounds)
            drain(broker)
        finally:
            worker.stop()
        broker.flushdb()
        # The second figure: one dead-letter triage over 100,000 letters (bench/dlq.py
        # has the whole comparison with the naive loop).
        from datetime import UTC, datetime

        from bench import dlq as dlq_bench

        letters = 10_000 if args.quick else 100_000
        print(f"  dead-letter triage of {letters:,} letters ...", flush=True)
        triage = dlq_bench.run_ours(engine, broker, letters, datetime.now(UTC), Path(folder))
        broker.flushdb()

    baseline, single_baseline = median(noops), median(single_noops)
    ours, single = median(sends), median(singles)
    ratio = round(ours / baseline, 2) if baseline else 0.0
    single_ratio = round(single / single_baseline, 2) if single_baseline else 0.0
    persist_ratio = round(median(sends, "persisted_per_s") / baseline, 2) if baseline else 0.0
    delivery_ratio = round(delivery["per_s"] / baseline, 2) if baseline else 0.0
    exact = all(
        run["emails_received"] == n == run["notifications"] and run["dead"] == 0
        for run in [*sends, *singles]
    ) and (delivery["emails_received"] == n == delivery["notifications"])
    print(f"\n  {'phase (median of rounds)':<40}{'items':>8}{'seconds':>10}{'per s':>10}")
    for label, runs in (
        ("no-op task (celery.accumulate)", noops),
        ("notifications.send -> SENT", sends),
        ("written rows -> SENT (delivery)", [delivery]),
        ("no-op task, TASK_BATCH_MAX=1 worker", single_noops),
        ("notifications.send, one task each", singles),
    ):
        print(
            f"  {label:<40}{n:>8,}{median(runs, 'seconds'):>10.1f}{median(runs):>10,.1f}"
            + (
                "   rounds: " + ", ".join(f"{run['per_s']:,.0f}" for run in runs)
                if len(runs) > 1
                else ""
            )
        )
    print(f"\n  per s / no-op tasks per s through the same worker ({baseline:,.1f}):")
    print(
        f"    end to end, notifications.send -> SENT: {ratio:.2f}   "
        f">= {TARGET_RATIO}: {verdict(ratio >= TARGET_RATIO)}"
    )
    print(
        f"    the send tasks alone (every row written): {persist_ratio:.2f}   (end to end "
        f"cannot beat it)"
    )
    print(
        f"    delivery alone, written rows -> SENT:   {delivery_ratio:.2f}   "
        f">= {TARGET_RATIO}: {verdict(delivery_ratio >= TARGET_RATIO)}"
    )
    gain = ratio / single_ratio if single_ratio else 0.0
    print(
        f"    one task per send (TASK_BATCH_MAX=1):   {single_ratio:.2f}   (against its own "
        f"no-op, {single_baseline:,.1f}/s; batching is {gain:.1f}x it)"
    )
    batches = sizes.get("count", 0.0)
    mean = sizes.get("sum", 0.0) / batches if batches else 0.0
    print(
        f"  batches: {batches:,.0f} for {sizes.get('sum', 0.0):,.0f} sends (mean {mean:.1f}; "
        f"{sizes.get('le 10.0', 0.0):,.0f} of at most 10, "
        f"{batches - sizes.get('le 50.0', 0.0):,.0f} over 50)"
    )
    print(
        "  CPUs busy (of "
        + str(CPUS)
        + ", median): "
        + ", ".join(
            f"{label} {median(runs, 'cpu_busy'):.0%}"
            for label, runs in (
                ("no-op", noops),
                ("send", sends),
                ("delivery", [delivery]),
                ("send one task each", singles),
            )
        )
        + " (one core is the worker's consumer, which every message passes through)"
    )
    print(
        f"  emails received: one per notification in every round ({len(sends) + len(singles)} "
        f"rounds and delivery, {n:,} each), 0 dead: {verdict(exact)}"
    )
    triage_ok = triage["seconds"] <= dlq_bench.TARGET_SECONDS
    print(
        f"  dead-letter triage: {triage['letters']:,} letters in {triage['seconds']:.2f} s "
        f"({triage['letters_per_s']:,.0f}/s)   <= {dlq_bench.TARGET_SECONDS:g} s: "
        f"{verdict(triage_ok)}   (bench/dlq.py compares it with the naive loop)"
    )
    if args.quick:
        print("  (quick: sizes shrunk for a smoke run; the target is set for the full run)")
    results.update(
        triage=triage,
        noop=noops,
        notifications=sends,
        delivery=delivery,
        single_noop=single_noops,
        single=singles,
        batch_sizes=sizes,
        summary={
            "ratio_end_to_end": ratio,
            "ratio_delivery": delivery_ratio,
            "ratio_send_tasks_alone": persist_ratio,
            "ratio_one_task_each": single_ratio,
            "end_to_end_pass": ratio >= TARGET_RATIO,
            "delivery_pass": delivery_ratio >= TARGET_RATIO,
            "exactly_once": exact,
        },
    )
    if args.json:
        print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
