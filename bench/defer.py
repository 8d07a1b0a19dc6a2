"""Deferral benchmark: what a backlog of tasks waiting out a gateway outage costs the broker,
on a real worker, Redis and PostgreSQL.

Setup: N PENDING Razorpay refunds; the Razorpay circuit breaker is held open (its shared state
in Redis, re-opened by the bench every 0.3 s), and `refunds.submit` is sent by name for each.
Every run of a task finds the breaker open and defers without calling the gateway: a new
message with a countdown, the old one acked. The worker runs with BREAKER_RESET_SECONDS=3, so
the first deferrals wait 3 s, 6 s, 12 s: the start of a day of deferrals in a few seconds.

Measured, with the idle worker's own Redis traffic (its polling, the bench's breaker) measured
beforehand and subtracted:
- Redis commands per deferral (publish, delivery, the unacked hash and index, the ack);
- broker memory per waiting task (the message in the unacked hash while it waits out its
  countdown) and the worker's resident memory, which holds each waiting message too.

Then the day of a 10,000-task backlog at the defaults (BREAKER_RESET_SECONDS 30, the 900 s
countdown cap, TASK_DEFER_MAX_SECONDS 86,400) is worked out from those figures: backstop's
deferral, which doubles the wait with every deferral in a row, against the baseline of
deferring every 30 s (the breaker's reopening time, fixed). Target: the baseline costs >= 10x
as many broker commands a day.

    .venv/bin/python -m tests.services -- .venv/bin/python bench/defer.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, service_urls, verdict  # noqa: E402
from tests import processes  # noqa: E402

BACKLOG = 10_000  # the day worked out below
RESET_SECONDS = 30.0  # BREAKER_RESET_SECONDS' default
TARGET_RATIO = 10.0


def seed(engine: Engine, n: int) -> list[int]:
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE refunds, payments, dead_letters RESTART IDENTITY CASCADE"))
        conn.execute(
            text(
                "INSERT INTO payments (gateway, gateway_payment_id, amount, currency, status) "
                "SELECT 'razorpay', 'pay_defer' || g, 50000, 'INR', 'COMPLETED' "
                "FROM generate_series(1, :n) AS g"
            ),
            {"n": n},
        )
        conn.execute(
            text(
                "INSERT INTO refunds (payment_id, amount, currency, reason) "
                "SELECT id, 1000, 'INR', 'bench' FROM payments ORDER BY id"
            )
        )
        return list(conn.execute(text("SELECT id FROM refunds ORDER BY id")).scalars())


class HeldOpen:
    """The Razorpay breaker kept open, as during an outage, from a thread of the bench."""

    def __init__(self, broker: redis.Redis) -> None:
        from workers.gateways.breaker import make_breaker

        self.breaker = make_breaker("razorpay", fail_max=5, reset_seconds=3, redis=broker)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            self.breaker.open()
            self.stop.wait(0.3)

    def __enter__(self) -> HeldOpen:
        self.breaker.open()
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()


def commands(broker: redis.Redis) -> int:
    return int(broker.info("stats")["total_commands_processed"])


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            continue
    return total


def worker_pids(proc: processes.Proc) -> list[int]:
    found = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(proc.popen.pid)], capture_output=True, text=True
    )
    return [proc.popen.pid, *(int(p) for p in found.stdout.split())]


def measure(engine: Engine, broker: redis.Redis, n: int, rounds: int, folder: Path) -> dict:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "LOG_LEVEL": "INFO",
        "RAZORPAY_KEY_ID": "rzp_test_bench",
        "RAZORPAY_KEY_SECRET": "bench_secret",
        "RAZORPAY_BASE_URL": "http://127.0.0.1:9",  # never called: the breaker is open
        "BREAKER_RESET_SECONDS": "3",
    }
    ids = seed(engine, n)
    broker.flushdb()
    worker = processes.worker(
        "defer",
        env,
        folder / "worker.log",
        "--prefetch-multiplier=1",
        "-O",
        "fair",
        queues="critical",
        concurrency=os.cpu_count() or 2,
    )
    try:
        with HeldOpen(broker):
            pids = worker_pids(worker)
            rss_idle = rss_kib(pids)
            memory_idle = int(broker.info("memory")["used_memory"])
            start, idle_from = time.monotonic(), commands(broker)
            time.sleep(5)
            idle_rate = (commands(broker) - idle_from) / (time.monotonic() - start)
            from workers.celery_app import app

            sent_from, started = commands(broker), time.monotonic()
            for refund_id in ids:
                app.send_task("refunds.submit", kwargs={"refund_id": refund_id})
            sending = commands(broker) - sent_from
            first = deferred_at_least(worker, n, started, timeout=max(120, n / 50))
            memory_parked = int(broker.info("memory")["used_memory"])
            rss_parked = rss_kib(worker_pids(worker))
            window_from, window_start = commands(broker), time.monotonic()
            before = deferrals(worker)
            deferred_at_least(worker, n * rounds, started, timeout=max(180, n / 20))
            window = time.monotonic() - window_start
            made = deferrals(worker) - before
            spent = commands(broker) - window_from - idle_rate * window
    finally:
        worker.stop()
    with engine.connect() as conn:
        touched = conn.execute(
            text(
                "SELECT count(*) FROM refunds WHERE status <> 'PENDING' OR (last_error IS NOT "
                "NULL AND last_error NOT LIKE '%circuit breaker is open%')"
            )
        ).scalar()
    return {
        "tasks": n,
        "first_round_seconds": round(first, 1),
        "idle_commands_per_second": round(idle_rate, 1),
        "send_commands_per_task": round(sending / n, 2),
        "deferrals_measured": made,
        "commands_per_deferral": round(spent / max(made, 1), 2),
        "broker_bytes_per_waiting_task": round((memory_parked - memory_idle) / n),
        "worker_kib_per_waiting_task": round((rss_parked - rss_idle) / n, 2),
        "refunds_touched": touched,
    }


def deferrals(worker: processes.Proc) -> int:
    return worker.output().count("task.deferred")


def deferred_at_least(worker: processes.Proc, count: int, started: float, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while deferrals(worker) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {deferrals(worker)} of {count} deferrals in {timeout:.0f}s")
        time.sleep(0.2)
    return time.monotonic() - started


def deferrals_per_day(wait: Any, day: float) -> int:
    elapsed, count = 0.0, 0
    while elapsed < day:
        elapsed += wait(count)
        count += 1
    return count


def report(measured: dict[str, Any]) -> dict[str, Any]:
    from config.settings import load_settings
    from workers.base import defer_countdown

    settings = load_settings()
    day = float(settings.TASK_DEFER_MAX_SECONDS)
    rng = random.Random(1)
    ours = deferrals_per_day(
        lambda n: defer_countdown(RESET_SECONDS, n, settings.max_countdown, rng), day
    )
    fixed = deferrals_per_day(lambda n: RESET_SECONDS, day)
    per = measured["commands_per_deferral"]
    ratio = fixed / ours
    print(
        f"\n{measured['tasks']:,} deferring tasks, measured: {per} Redis commands per "
        f"deferral, {measured['broker_bytes_per_waiting_task']:,} bytes of broker memory and "
        f"{measured['worker_kib_per_waiting_task']} KiB of worker memory per waiting task"
    )
    print(f"refunds that reached the gateway (must be 0): {measured['refunds_touched']}")
    print(f"\nA day's outage for {BACKLOG:,} tasks, breaker reset {RESET_SECONDS:g} s:")
    settled = {"fixed": RESET_SECONDS, "ours": settings.max_countdown * 0.9}  # mean wait
    for label, key, count in (
        ("baseline, every 30 s", "fixed", fixed),
        ("ours, doubling to 900 s", "ours", ours),
    ):
        print(
            f"  {label:<24} {count:>5,} deferrals per task, "
            f"{count * BACKLOG * per / 1e6:6.1f} M Redis commands a day, "
            f"{BACKLOG * per / settled[key]:6.0f} commands/s once the outage is long"
        )
    memory = BACKLOG * measured["broker_bytes_per_waiting_task"] / 2**20
    print(f"  broker memory while they wait (either way): {memory:.1f} MiB")
    ok = ratio >= TARGET_RATIO and measured["refunds_touched"] == 0
    print(f"ratio baseline/ours: {ratio:.1f}x (target >= {TARGET_RATIO:g}x)  {verdict(ok)}")
    return {"deferrals_per_day_ours": ours, "deferrals_per_day_fixed": fixed, "ratio": ratio}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 tasks, for a smoke run")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()
    urls = service_urls()
    if urls is None:
        return 2
    url, broker_url = urls
    from workers.db import get_engine
    from workers.db.migrate import upgrade

    upgrade(url)
    engine = get_engine()
    broker = redis.Redis.from_url(broker_url)
    n, rounds = (500, 2) if args.quick else (BACKLOG, 3)
    print(f"backstop deferral bench ({'quick' if args.quick else 'full'})")
    results: dict[str, Any] = {"mode": "quick" if args.quick else "full"}
    results["machine"] = machine(engine, broker)
    with tempfile.TemporaryDirectory(prefix="backstop-bench-") as folder:
        results["measured"] = measure(engine, broker, n, rounds, Path(folder))
    results["summary"] = report(results["measured"])
    if args.json:
        print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
