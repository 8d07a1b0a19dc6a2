"""Fault drills: what backstop keeps when production breaks under it, on real processes.

(a) Redis crash mid-burst. N emails are sent by name (`notifications.send`) at 150/s to a
    worker running as the Procfile does (with beat, the outbox sweep shortened to 10 s / 5 s;
    NOTIFY_TIMEOUT_SECONDS and the batch at their defaults), to an SMTP server in this process.
    A private redis-server (AOF, appendfsync always) is SIGKILLed after a third of them and
    started again 3 s later. Measured: seconds from Redis back to every accepted notification
    SENT, emails delivered twice, notifications lost (must be 0). Baseline, same run: the same
    burst with no crash, from its last message accepted to all SENT.
(b) Worker crashes during refunds. M refunds sent by name (`refunds.submit`) while the
    simulator answers 15% of refund creations 503 and loses 10% of the answers after making
    the refund; the worker's whole process group is SIGKILLed 3 times. A last worker runs beat
    with the refund retry job every minute. Measured: refunds made twice at the gateway (must
    be 0), left unfinished (must be 0), seconds to all COMPLETED.
(c) PostgreSQL restarts during the hold sweep. H holds fall due over max(20 s, H / 400 s)
    while a booking service confirms half of them with its own SQL, each within a second of its
    expiry, and `holds.expire` is sent for each; beat sweeps every second; a private PostgreSQL
    is restarted twice mid-way. Measured: holds both
    confirmed and expired (must be 0), ACTIVE past due at the end (must be 0).

    .venv/bin/python -m tests.services -- .venv/bin/python bench/faults.py [--quick] [--json]

`--quick` shrinks every size for a smoke run (and `make test` runs it). A scenario that breaks
its promise prints FAIL; the exit code stays 0: this is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import create_engine, func, insert, select, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, service_urls, verdict  # noqa: E402
from tests import processes  # noqa: E402
from tests.processes import PostgresServer, Proc, RedisServer, Sender  # noqa: E402
from tests.smtp_sink import SmtpSink  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    notifications: int
    refunds: int
    holds: int
    kills: int
    restarts: int


FULL = Sizes(notifications=3000, refunds=600, holds=20_000, kills=3, restarts=2)
QUICK = Sizes(notifications=600, refunds=100, holds=2_000, kills=1, restarts=1)


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def wait(check: Any, timeout: float, every: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return bool(check())


# -- (a) -----------------------------------------------------------------------------------------


def burst(n: int, tag: str) -> list[dict[str, Any]]:
    return [
        {
            "channel": "email",
            "recipient": f"guest{i}@example.com",
            "template": "booking_confirmed",
            "data": {"resource_id": f"court-{i % 4}", "start_time": "18:00"},
            "dedupe_key": f"{tag}-{i}",
        }
        for i in range(n)
    ]


def notifications(database_url: str, n: int, folder: Path) -> dict[str, Any]:
    engine = create_engine(database_url)

    def sent(keys: list[str]) -> int:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text(
                        "SELECT count(*) FROM notifications WHERE status = 'SENT' "
                        "AND dedupe_key = ANY(:keys)"
                    ),
                    {"keys": keys},
                ).scalar()
            )

    results: dict[str, Any] = {}
    with SmtpSink() as smtp:
        for crash in (False, True):
            broker = RedisServer(folder / f"redis-{crash}")
            broker.start()
            worker = processes.worker(
                f"faults-a-{crash}",
                env(
                    BROKER_URL=broker.url,
                    NOTIFY_OUTBOX_SWEEP_SECONDS="10",
                    NOTIFY_OUTBOX_AFTER_SECONDS="5",
                    NOTIFY_EMAIL_FROM="bookings@example.com",
                    SMTP_HOST="127.0.0.1",
                    SMTP_PORT=str(smtp.port),
                    SMTP_STARTTLS="false",
                ),
                folder / f"worker-a-{crash}.log",
                "--beat",
                f"--schedule={folder / f'beat-a-{crash}'}",
                "--prefetch-multiplier=1",
                "-O",
                "fair",
                queues="critical,default,notifications,batch",
                concurrency=os.cpu_count() or 2,
            )
            smtp.handler.reset()
            try:
                sender = Sender(broker.url, "notifications.send", burst(n, f"a{crash}"), 150)
                sender.start()
                if crash:
                    wait(lambda s=sender: len(s.accepted) >= n // 3, 120, 0.05)
                    broker.kill()
                    time.sleep(3)
                    broker.start()
                    since = time.monotonic()  # Redis back
                sender.join(timeout=300)
                last = time.monotonic()  # the last message accepted
                if not crash:
                    since = last
                keys = [p["dedupe_key"] for p in sender.accepted]
                done = wait(lambda keys=keys: sent(keys) == len(keys), 300, 0.1)
                seconds = time.monotonic() - since
                ids = Counter(m["Message-ID"] for m in smtp.messages)
                results["crash" if crash else "baseline"] = {
                    "accepted": len(keys),
                    "refused": sender.refused,
                    "seconds_to_all_sent": round(seconds, 1),
                    "seconds_after_last_accepted": round(time.monotonic() - last, 1),
                    "lost": len(keys) - sent(keys),
                    "delivered_twice": sum(c - 1 for c in ids.values() if c > 1),
                    "all_sent": done,
                }
            finally:
                worker.stop()
                broker.stop()
    engine.dispose()
    crash, base = results["crash"], results["baseline"]
    ok = crash["lost"] == 0 and crash["seconds_to_all_sent"] <= 120
    print(
        f"(a) {n:,} emails, Redis SIGKILLed after a third, back 3 s later: all "
        f"{crash['accepted']:,} accepted SENT {crash['seconds_to_all_sent']} s after Redis came "
        f"back, {crash['seconds_after_last_accepted']} s after the last was accepted (baseline "
        f"without a crash: {base['seconds_after_last_accepted']} s); "
        f"{crash['delivered_twice']} delivered twice; {crash['lost']} lost; "
        f"{crash['refused']} refused while Redis was down (the sender's to send again)  "
        f"{verdict(ok)}"
    )
    return {**results, "ok": ok}


# -- (b) -----------------------------------------------------------------------------------------


def refunds(m: int, kills: int, folder: Path) -> dict[str, Any]:
    from tests.workers.factories import CAPTURED, CURRENCY
    from workers.db import session_scope
    from workers.devtools.simulator import SimulatorServer
    from workers.models import DeadLetter, Payment, Refund

    with SimulatorServer() as server:
        sim = server.state
        ids: list[int] = []
        with session_scope() as session:
            for gateway in CURRENCY:
                made = sim.add_payments(
                    gateway,
                    [
                        {
                            "amount": 10_000,
                            "currency": CURRENCY[gateway],
                            "status": CAPTURED[gateway],
                        }
                        for _ in range(m // 2)
                    ],
                )
                payments = session.execute(
                    insert(Payment).returning(Payment.id),
                    [
                        {
                            "gateway": gateway,
                            "gateway_payment_id": gid,
                            "amount": 10_000,
                            "currency": CURRENCY[gateway],
                            "status": "COMPLETED",
                        }
                        for gid in made
                    ],
                ).scalars()
                ids += session.execute(
                    insert(Refund).returning(Refund.id),
                    [
                        {"payment_id": p, "amount": 1_000, "currency": CURRENCY[gateway]}
                        for p in payments
                    ],
                ).scalars()
        sim.add_fault("*.refund.create", "503", rate=0.15)
        sim.add_fault("*.refund.create", "lost", rate=0.10, hang_seconds=1.5)
        sim.add_fault("*.refund.create", "latency", latency_ms=20)
        worker_env = env(
            **server.gateway_env(),
            GATEWAY_TIMEOUT_SECONDS="1",
            TASK_RETRY_BASE_SECONDS="0.3",
            TASK_RETRY_MAX_SECONDS="2",
            TASK_MAX_RETRIES="50",
            BROKER_VISIBILITY_TIMEOUT_SECONDS="12",
            TASK_SOFT_TIME_LIMIT_SECONDS="4",
            TASK_TIME_LIMIT_SECONDS="5",
            BREAKER_RESET_SECONDS="3",
        )

        def start(name: str, *extra: str, **more: str) -> Proc:
            return processes.worker(
                name,
                {**worker_env, **more},
                folder / f"{name}.log",
                *extra,
                queues="critical",
                concurrency=4,
            )

        def unfinished() -> int:
            with session_scope() as session:
                return int(
                    session.scalar(
                        select(func.count()).where(Refund.id.in_(ids), Refund.status != "COMPLETED")
                    )
                )

        from workers.celery_app import app

        started = time.monotonic()
        worker = start("faults-b-0")
        for refund_id in ids:
            app.send_task("refunds.submit", kwargs={"refund_id": refund_id})
        for kill in range(kills):
            time.sleep(3)
            worker.stop(signal.SIGKILL)
            worker = start(f"faults-b-{kill + 1}") if kill < kills - 1 else worker
        worker = start(
            "faults-b-last",
            "--beat",
            f"--schedule={folder / 'beat-b'}",
            REFUND_RETRY_CRON="* * * * *",
            REFUND_PENDING_AFTER_SECONDS="15",
        )
        try:
            wait(lambda: unfinished() == 0, 300, 1)
        finally:
            worker.stop()
        seconds = time.monotonic() - started
        effects = sim.effects()
        with session_scope() as session:
            letters = int(session.scalar(select(func.count()).select_from(DeadLetter)))
        injected = sim.stats()["faults_injected"]
    result = {
        "refunds": m,
        "kills": kills,
        "made_twice": len(effects["duplicates"]),
        "created_at_gateway": effects["refunds_created"],
        "unfinished": unfinished(),
        "dead_letters": letters,
        "seconds": round(seconds, 1),
        "faults_injected": injected,
    }
    ok = result["made_twice"] == 0 and result["unfinished"] == 0
    print(
        f"(b) {m} refunds, the worker SIGKILLed {kills} times, "
        f"{injected.get('503', 0)} answers 503 and {injected.get('lost', 0)} lost after the "
        f"effect: {result['made_twice']} made twice, {result['unfinished']} unfinished, "
        f"{result['created_at_gateway']} created at the gateway, all COMPLETED in "
        f"{result['seconds']} s  {verdict(ok)}"
    )
    return {**result, "ok": ok}


# -- (c) -----------------------------------------------------------------------------------------


def holds(h: int, restarts: int, folder: Path) -> dict[str, Any]:
    database = PostgresServer(folder / "postgres")
    database.create()
    from workers.db.migrate import upgrade

    upgrade(database.url)
    engine = create_engine(database.url, pool_pre_ping=True)
    rng = random.Random(7)
    start = datetime.now(UTC) + timedelta(seconds=15)  # the worker starts, the tasks are sent
    window = max(20.0, h / 400)
    rows = [
        {
            "resource_id": f"r{i}",
            "user_id": f"u{i}",
            "start_time": start + timedelta(days=1),
            "end_time": start + timedelta(days=1, hours=1),
            "expires_at": start + timedelta(seconds=rng.uniform(0, window)),
        }
        for i in range(h)
    ]
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE booking_holds RESTART IDENTITY CASCADE"))
        conn.execute(
            text(
                "INSERT INTO booking_holds (resource_id, user_id, start_time, end_time, "
                "expires_at) VALUES (:resource_id, :user_id, :start_time, :end_time, :expires_at)"
            ),
            rows,
        )
        ids = list(conn.execute(text("SELECT id FROM booking_holds ORDER BY id")).scalars())
    expiry = {i: row["expires_at"] for i, row in zip(ids, rows, strict=True)}
    worker = processes.worker(
        "faults-c",
        env(DATABASE_URL=database.url, HOLD_SWEEP_SECONDS="1", DB_LOCK_TIMEOUT_MS="2000"),
        folder / "worker-c.log",
        "--beat",
        f"--schedule={folder / 'beat-c'}",
        queues="critical,default",
        concurrency=os.cpu_count() or 2,
    )
    from workers.celery_app import app

    for hold in ids:
        wait_s = max(0.0, (expiry[hold] - datetime.now(UTC)).total_seconds())
        app.send_task("holds.expire", kwargs={"hold_id": hold}, countdown=min(wait_s, 60))
    confirmed: set[int] = set()
    refused = Counter[str]()
    # The booking service confirms half the holds, each within a second either side of its
    # expiry: before it, at it, and too late. The attempts are taken in time order by four
    # connections at once.
    attempts = sorted(
        (expiry[hold] + timedelta(seconds=rng.uniform(-1, 1)), hold)
        for hold in rng.sample(ids, h // 2)
    )
    queue = iter(attempts)
    lock = threading.Lock()

    def confirmer() -> None:
        """The booking service's own SQL, retried while PostgreSQL restarts."""
        while True:
            with lock:
                at, hold = next(queue, (None, None))
            if hold is None:
                return
            time.sleep(max(0.0, (at - datetime.now(UTC)).total_seconds()))
            while True:
                try:
                    with engine.begin() as conn:
                        changed = conn.execute(
                            text(
                                "UPDATE booking_holds SET status = 'CONFIRMED', "
                                "updated_at = now() WHERE id = :id AND status = 'ACTIVE'"
                            ),
                            {"id": hold},
                        ).rowcount
                except Exception:
                    with lock:
                        refused["database_down"] += 1
                    time.sleep(0.2)
                    continue
                with lock:
                    (confirmed.add(hold) if changed else refused.update(["too_late"]))
                break

    threads = [threading.Thread(target=confirmer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for n in range(restarts):
        at = start + timedelta(seconds=window * (n + 1) / (restarts + 1))
        time.sleep(max(0.0, (at - datetime.now(UTC)).total_seconds()))
        database.restart()
    for thread in threads:
        thread.join(timeout=window + 120)

    def active_past_due() -> int:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text(
                        "SELECT count(*) FROM booking_holds WHERE status = 'ACTIVE' "
                        "AND expires_at <= now()"
                    )
                ).scalar()
            )

    wait(lambda: active_past_due() == 0, 60, 1)
    with engine.connect() as conn:
        expired = set(
            conn.execute(
                text("SELECT entity_id FROM state_transitions WHERE to_status = 'EXPIRED'")
            ).scalars()
        )
        statuses = Counter(
            dict(conn.execute(text("SELECT status, count(*) FROM booking_holds GROUP BY 1")).all())
        )
    late = active_past_due()
    retries = worker.output().count("task.retry")
    worker.stop()
    engine.dispose()
    database.stop()
    result = {
        "holds": h,
        "postgres_restarts": database.restarts,
        "confirmed": len(confirmed),
        "confirmations_refused_too_late": refused["too_late"],
        "confirmations_retried_database_down": refused["database_down"],
        "both_confirmed_and_expired": len(confirmed & expired),
        "active_past_due": late,
        "worker_retries": retries,
        "statuses": dict(statuses),
    }
    ok = result["both_confirmed_and_expired"] == 0 and result["active_past_due"] == 0
    print(
        f"(c) {h:,} holds due over {window:.0f} s, half confirmed by the booking service, "
        f"PostgreSQL restarted {database.restarts} times: {len(confirmed):,} confirmed, "
        f"{statuses.get('EXPIRED', 0):,} expired, {result['both_confirmed_and_expired']} both, "
        f"{result['active_past_due']} ACTIVE past due; {retries} task retries, "
        f"{refused['database_down']} confirmations retried  {verdict(ok)}"
    )
    return {**result, "ok": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()
    urls = service_urls()
    if urls is None:
        return 2
    url, broker_url = urls
    sizes = QUICK if args.quick else FULL
    from workers.db import get_engine
    from workers.db.migrate import upgrade

    upgrade(url)
    engine = get_engine()
    with engine.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE refunds, payments, notification_attempts, notifications, "
                "dead_letter_events, dead_letters, state_transitions, job_runs "
                "RESTART IDENTITY CASCADE"
            )
        )
    print(f"backstop fault drills ({'quick' if args.quick else 'full'})")
    results: dict[str, Any] = {"mode": "quick" if args.quick else "full"}
    results["machine"] = machine(engine, redis.Redis.from_url(broker_url))
    with tempfile.TemporaryDirectory(prefix="backstop-faults-") as folder:
        os.chmod(folder, 0o755)
        root = Path(folder)
        results["a_redis_crash"] = notifications(url, sizes.notifications, root)
        results["b_worker_kills"] = refunds(sizes.refunds, sizes.kills, root)
        results["c_postgres_restarts"] = holds(sizes.holds, sizes.restarts, root)
    if args.json:
        print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
