"""Refund retry benchmark: one retry cycle over a backlog of stuck refunds, on a real
PostgreSQL, Redis and Celery, against the gateway simulator with 20 ms on every call.

Setup: N refunds stuck PROCESSING for 2 hours, half Razorpay and half Stripe, each pointing at a
refund the simulator made `pending` and has since settled (processed / succeeded), so every
re-check finds a final answer. Rows go in with set-based SQL; the database is reloaded,
vacuumed and checkpointed before every run, and Redis (queues, breaker state) flushed.

1. Ours: `refunds.retry_stuck` sent by name, as beat sends it, to real worker(s) consuming
   `critical`. It claims the due refunds in batches (SKIP LOCKED) and fans them out as
   `refunds.check_many` tasks of REFUND_CHECK_CHUNK refunds, each asking the gateways
   GATEWAY_CONCURRENCY at a time; the cycle ends when every refund is COMPLETED. Run with:
   - procfile (the default): the product's `worker` line (prefork, concurrency = CPU count,
     prefetch 1, -O fair);
   - on request (`--shape`), the other pools and sizes listed in SHAPES.
2. Baseline: the sequential loop, one process, one refund at a time: `get_gateway(...)
   .fetch_refund`, then the audited transition and a commit; on a subset, extrapolated.

Targets: ours <= 60 s for the full backlog, and ours >= 10x the baseline's refunds/s.
The simulator must see exactly one refund fetch per refund per run, and no refund created.

The simulator runs in this process (a threaded werkzeug server, its own threads); its CPU is
shown beside the workers', Postgres' and Redis', because on 2 cores they all share them.

Run it with `make bench` (which starts a private PostgreSQL and Redis for it):

    .venv/bin/python -m tests.services -- .venv/bin/python bench/refunds.py [--quick] [--json]

`--quick` shrinks every size for a smoke run; `--shape NAME` (repeatable) runs only those worker
shapes; `--json` also prints the results as one JSON object on the last line. A missed target
prints FAIL but the exit code stays 0: this is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the shared process helpers live in tests/

from bench.common import machine, scalar, service_urls, settle, verdict  # noqa: E402
from tests import processes  # noqa: E402
from tests.processes import Proc  # noqa: E402

LATENCY_MS = 20
TARGET_SECONDS = 60.0
TARGET_RATIO = 10.0
CURRENCY = {"razorpay": "INR", "stripe": "usd"}
CAPTURED = {"razorpay": "captured", "stripe": "succeeded"}
SETTLED = {"razorpay": "processed", "stripe": "succeeded"}
FETCHES = ("razorpay.refund.fetch", "stripe.refund.fetch")
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The default REFUND_STUCK_AFTER_SECONDS: the backlog is 2 h old, so all of it is due.
STUCK_AFTER = timedelta(hours=1)


@dataclass(frozen=True)
class Shape:
    """A way to run the worker(s) for the critical queue."""

    label: str
    pool: str  # prefork or threads
    concurrency: int
    processes: int = 1
    procfile: bool = False  # the Procfile's `worker` line: its queues and options

    def args(self) -> list[str]:
        extra = ["-P", self.pool]
        if self.procfile:
            extra += ["--prefetch-multiplier=1", "-O", "fair"]
        return extra


CPUS = os.cpu_count() or 1
SHAPES = {
    "procfile": Shape(f"Procfile: prefork -c {CPUS}", "prefork", CPUS, procfile=True),
    "threads32": Shape("threads -c 32", "threads", 32),
    "threads16x2": Shape("2 x threads -c 16", "threads", 16, processes=2),
    "prefork16": Shape("prefork -c 16", "prefork", 16),
    "prefork32": Shape("prefork -c 32", "prefork", 32),
}


@dataclass(frozen=True)
class Sizes:
    refunds: int
    baseline: int  # refunds the sequential loop runs on
    shapes: tuple[str, ...]
    timeout: float  # per run of ours


FULL = Sizes(refunds=10_000, baseline=1_000, shapes=("procfile",), timeout=600.0)
QUICK = Sizes(refunds=1_000, baseline=200, shapes=("procfile",), timeout=180.0)


# -- setup ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backlog:
    """What the simulator holds, index i for our refund id i + 1."""

    gateways: list[str]
    payment_ids: list[str]
    refund_ids: list[str]
    keys: list[str]

    def __len__(self) -> int:
        return len(self.refund_ids)


def seed_simulator(
    state: Any, n: int, *, tag: str = "bench", reached: Callable[[int], bool] | None = None
) -> Backlog:
    """n captured payments and one refund each, made pending and then settled at the gateway.
    The refunds are made under the simulator's lock with its own constructor (there is no bulk
    endpoint for them); each carries our reference, as the adapters write it. `reached(i)`
    False: refund i never reached the gateway (none made; its id is "")."""
    gateways = ["razorpay" if i % 2 == 0 else "stripe" for i in range(n)]
    payment_ids = [
        f"pay_{tag}{i + 1:010d}" if gw == "razorpay" else f"pi_{tag}{i + 1:020d}"
        for i, gw in enumerate(gateways)
    ]
    keys = [f"bkr-{i + 1}-{tag}0000000000" for i in range(n)]
    for gw in CURRENCY:
        state.set_refund_outcome(gw, "pending")
        state.add_payments(
            gw,
            [
                {"id": pid, "amount": 10_000, "currency": CURRENCY[gw], "status": CAPTURED[gw]}
                for pid, g in zip(payment_ids, gateways, strict=True)
                if g == gw
            ],
        )
    refund_ids = []
    with state._lock:
        for i, (gw, pid) in enumerate(zip(gateways, payment_ids, strict=True)):
            if reached is not None and not reached(i):
                refund_ids.append("")
                continue
            payment = state._payments[gw][pid]
            notes = {"backstop_refund_id": str(i + 1), "backstop_idempotency_key": keys[i]}
            refund = state._create_refund(
                gw, payment, 2_500, notes=notes, receipt=f"refund-{i + 1}", reason=None, key=keys[i]
            )
            refund_ids.append(refund.id)
    for refund_id, gw in zip(refund_ids, gateways, strict=True):
        if refund_id:
            state.settle_refund(refund_id, SETTLED[gw])
    return Backlog(gateways, payment_ids, refund_ids, keys)


PAYMENTS_SQL = """
INSERT INTO payments (id, gateway, gateway_payment_id, amount, currency, status,
                      created_at, updated_at)
SELECT n, gw, pid, 10000, upper(cur), 'COMPLETED', now() - interval '3 hours',
       now() - interval '3 hours'
FROM unnest(CAST(:gateways AS text[]), CAST(:payment_ids AS text[]), CAST(:currencies AS text[]))
     WITH ORDINALITY AS t(gw, pid, cur, n)
"""
REFUNDS_SQL = """
INSERT INTO refunds (id, payment_id, amount, currency, reason, status, idempotency_key,
                     gateway_refund_id, attempts, key_sent_at, created_at, updated_at)
SELECT n, n, 2500, upper(cur), 'booking cancelled', 'PROCESSING', key, rid, 1,
       now() - interval '2 hours', now() - interval '2 hours', now() - interval '2 hours'
FROM unnest(CAST(:refund_ids AS text[]), CAST(:keys AS text[]), CAST(:currencies AS text[]))
     WITH ORDINALITY AS t(rid, key, cur, n)
"""


def load_backlog(engine: Engine, broker: redis.Redis, backlog: Backlog) -> None:
    """The identical starting point for every run: only the stuck refunds, vacuumed and
    analyzed, checkpointed; no queued messages and a closed breaker."""
    currencies = [CURRENCY[gw] for gw in backlog.gateways]
    with engine.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE refunds, payments, state_transitions, job_runs, notifications "
                "RESTART IDENTITY CASCADE"
            )
        )
        conn.execute(
            text(PAYMENTS_SQL),
            {
                "gateways": backlog.gateways,
                "payment_ids": backlog.payment_ids,
                "currencies": currencies,
            },
        )
        conn.execute(
            text(REFUNDS_SQL),
            {"refund_ids": backlog.refund_ids, "keys": backlog.keys, "currencies": currencies},
        )
        for table in ("payments", "refunds"):
            conn.execute(
                text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), :n)"),
                {"n": len(backlog)},
            )
    settle(engine, "payments, refunds")
    broker.flushdb()


def completed(engine: Engine) -> int:
    return int(scalar(engine, "SELECT count(*) FROM refunds WHERE status = 'COMPLETED'"))


# -- CPU accounting ---------------------------------------------------------------------------


def cpu_snapshot(workers: list[Proc]) -> dict[str, float]:
    """CPU seconds used so far, by part: our workers (every process in their groups), Postgres,
    Redis, this process (the bench and the simulator's threads), and the whole machine."""
    groups = {proc.popen.pid for proc in workers}
    used = {"workers": 0.0, "postgres": 0.0, "redis": 0.0}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                raw = stat.read()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        seconds = (int(fields[11]) + int(fields[12])) / CLK_TCK
        if int(fields[2]) in groups:
            used["workers"] += seconds
        elif comm.startswith("postgres"):
            used["postgres"] += seconds
        elif comm.startswith("redis"):
            used["redis"] += seconds
    times = os.times()
    used["bench"] = times.user + times.system
    with open("/proc/stat") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:]]
    used["machine_busy"] = (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK
    used["machine_total"] = sum(ticks) / CLK_TCK
    used["main_thread"] = time.thread_time()
    return used


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    delta = {key: after[key] - before[key] for key in before}
    # This process less its main thread (which only polls): the simulator's threads.
    delta["simulator"] = delta.pop("bench") - delta.pop("main_thread")
    delta["utilization"] = delta.pop("machine_busy") / max(delta.pop("machine_total"), 1e-9)
    return delta


# -- ours -------------------------------------------------------------------------------------


def worker_env(server: Any) -> dict[str, str]:
    return {
        **os.environ,
        **server.gateway_env(),
        "PYTHONUNBUFFERED": "1",
    }


def start_workers(shape: Shape, env: dict[str, str], logs: Path, tag: str) -> list[Proc]:
    queues = "critical,default,notifications" if shape.procfile else "critical"
    started = []
    try:
        for index in range(shape.processes):
            name = f"bench-{tag}-{index}"
            started.append(
                processes.worker(
                    name,
                    env,
                    logs / f"{name}.log",
                    *shape.args(),
                    queues=queues,
                    concurrency=shape.concurrency,
                )
            )
    except BaseException:
        for proc in started:
            proc.stop()
        raise
    return started


def fetches(state: Any) -> dict[str, int]:
    return dict(state.stats()["requests"])


def run_ours(
    engine: Engine,
    broker: redis.Redis,
    server: Any,
    backlog: Backlog,
    shape: Shape,
    sizes: Sizes,
    logs: Path,
    tag: str,
) -> dict[str, Any]:
    from workers.messaging.enqueue import send

    n = len(backlog)
    load_backlog(engine, broker, backlog)
    workers = start_workers(shape, worker_env(server), logs, tag)
    requests_before = fetches(server.state)
    try:
        cpu_before = cpu_snapshot(workers)
        started = time.perf_counter()
        send("refunds.retry_stuck", {})
        deadline = time.monotonic() + sizes.timeout
        done = 0
        first_done = None
        while True:
            done = completed(engine)
            if done and first_done is None:
                first_done = time.perf_counter() - started
            if done >= n or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        seconds = time.perf_counter() - started
        cpu = cpu_delta(cpu_before, cpu_snapshot(workers))
    finally:
        for proc in workers:
            proc.stop()
    requests = {
        key: value - requests_before.get(key, 0)
        for key, value in fetches(server.state).items()
        if value - requests_before.get(key, 0)
    }
    with engine.connect() as conn:
        fanout = conn.execute(
            text(
                "SELECT extract(epoch FROM finished_at - started_at)::float8, counts "
                "FROM job_runs WHERE job_name = 'refunds.retry_stuck'"
            )
        ).first()
        audit = conn.execute(text("SELECT count(*) FROM state_transitions")).scalar()
    broker.flushdb()
    return {
        "shape": shape.label,
        "refunds": n,
        "completed": done,
        "finished": done >= n,
        "seconds": round(seconds, 3),
        "refunds_per_s": round(done / seconds, 1),
        "first_completed_s": None if first_done is None else round(first_done, 3),
        "fanout_s": None if fanout is None else round(fanout[0], 3),
        "fanout_counts": None if fanout is None else fanout[1],
        "audit_rows": audit,
        "requests": requests,
        "cpu_s": {key: round(value, 2) for key, value in cpu.items()},
    }


# -- baseline ---------------------------------------------------------------------------------


def run_baseline(engine: Engine, broker: redis.Redis, backlog: Backlog, n: int) -> dict[str, Any]:
    """The sequential loop: read the stuck refunds, then for each ask its gateway and move the
    row (audited), one commit per refund. Wall and own-thread CPU per step are kept."""
    from sqlalchemy import select

    from workers.base import utcnow
    from workers.db import new_session, transition
    from workers.gateways.registry import forget_gateways, get_gateway
    from workers.models import Payment, Refund

    load_backlog(engine, broker, backlog)
    forget_gateways()
    session = new_session()
    wall = {"read": 0.0, "gateway": 0.0, "write": 0.0}
    cpu = dict(wall)
    try:
        started = time.perf_counter()
        rows = session.execute(
            select(Refund.id, Payment.gateway, Payment.gateway_payment_id, Refund.gateway_refund_id)
            .join(Payment, Payment.id == Refund.payment_id)
            .where(Refund.status == "PROCESSING", Refund.updated_at <= utcnow() - STUCK_AFTER)
            .order_by(Refund.id)
            .limit(n)
        ).all()
        session.commit()
        wall["read"] = time.perf_counter() - started
        cpu["read"] = time.thread_time()
        for refund_id, gateway, payment_id, gateway_refund_id in rows:
            t0, c0 = time.perf_counter(), time.thread_time()
            result = get_gateway(gateway).fetch_refund(payment_id, gateway_refund_id)
            t1, c1 = time.perf_counter(), time.thread_time()
            if result.status != "PROCESSING":
                transition(
                    session,
                    "refunds",
                    refund_id,
                    result.status,
                    actor="bench.sequential",
                    reason=f"gateway refund {result.id} is {result.raw_status}",
                    now=utcnow(),
                    values={"gateway_refund_id": result.id},
                )
            session.commit()
            t2, c2 = time.perf_counter(), time.thread_time()
            wall["gateway"] += t1 - t0
            wall["write"] += t2 - t1
            cpu["gateway"] += c1 - c0
            cpu["write"] += c2 - c1
        seconds = time.perf_counter() - started
    finally:
        session.close()
    done = int(
        scalar(
            engine,
            "SELECT count(*) FROM refunds WHERE status = 'COMPLETED' AND id <= :n",
            n=n,
        )
    )
    return {
        "refunds": len(rows),
        "completed": done,
        "seconds": round(seconds, 3),
        "refunds_per_s": round(len(rows) / seconds, 1),
        "ms_per_refund": {
            step: round(1000 * value / max(len(rows), 1), 2) for step, value in wall.items()
        },
        "client_cpu_ms_per_refund": {
            step: round(1000 * value / max(len(rows), 1), 2)
            for step, value in cpu.items()
            if step != "read"
        },
    }


# -- report ---------------------------------------------------------------------------------


def per_refund_ms(run: dict[str, Any], part: str) -> float:
    return 1000 * run["cpu_s"][part] / max(run["completed"], 1)


def report(
    ours: dict[str, dict[str, Any]], base: dict[str, Any], sizes: Sizes, effects: dict[str, Any]
) -> dict[str, Any]:
    n, base_rate = sizes.refunds, base["refunds_per_s"]
    print(
        f"\n  {'approach':<30}{'refunds':>9}{'seconds':>9}{'refunds/s':>11}{'x base':>8}"
        f"{'fan-out s':>11}   <= {TARGET_SECONDS:g} s   >= {TARGET_RATIO:g}x"
    )
    summary: dict[str, Any] = {}
    for key, run in ours.items():
        ratio = round(run["refunds_per_s"] / base_rate, 2)
        in_time = run["finished"] and run["seconds"] <= TARGET_SECONDS
        fast = run["finished"] and ratio >= TARGET_RATIO
        summary[key] = {"ratio": ratio, "within_60s": in_time, "ratio_pass": fast}
        seconds = f"{run['seconds']:.1f}" if run["finished"] else f">{sizes.timeout:.0f}"
        fanout = "-" if run["fanout_s"] is None else f"{run['fanout_s']:.1f}"
        print(
            f"  {'ours, ' + run['shape']:<30}{run['completed']:>9,}{seconds:>9}"
            f"{run['refunds_per_s']:>11,.1f}{ratio:>7.1f}x{fanout:>11}"
            f"   {verdict(in_time):>7}   {verdict(fast):>5}"
        )
    whole = n / base_rate
    print(
        f"  {'baseline, sequential loop':<30}{base['refunds']:>9,}{base['seconds']:>9.1f}"
        f"{base_rate:>11,.1f}{1:>7.1f}x"
    )
    print(
        f"  baseline ran on {base['refunds']:,} of the {n:,} refunds: all of them at that rate "
        f"would take ~{whole:,.0f} s."
    )
    print(
        "  fan-out s: how long `refunds.retry_stuck` took to claim the backlog and send its tasks."
    )

    print(
        f"\n  CPU per refund, ms      {'workers':>9}{'simulator':>11}{'postgres':>10}{'redis':>8}"
        f"{'total':>8}   machine busy    ceiling"
    )
    for run in ours.values():
        parts = [per_refund_ms(run, part) for part in ("workers", "simulator", "postgres", "redis")]
        total = sum(parts)
        print(
            f"  {run['shape']:<24}{parts[0]:>9.1f}{parts[1]:>11.1f}{parts[2]:>10.1f}"
            f"{parts[3]:>8.1f}{total:>8.1f}   {100 * run['cpu_s']['utilization']:>11.0f}%"
            f"   {CPUS * 1000 / total:>7,.0f}/s"
        )
    need = TARGET_RATIO * base_rate
    print(f"  ceiling: the refunds/s at which that much CPU per refund fills all {CPUS} CPUs.")
    print(
        f"  {TARGET_RATIO:g}x the baseline is {need:,.0f} refunds/s: on {CPUS} CPUs that leaves "
        f"{CPUS * 1000 / need:.1f} ms of CPU per refund for everything above together."
    )
    ms, cpu = base["ms_per_refund"], base["client_cpu_ms_per_refund"]
    print(
        f"  baseline, per refund: gateway call {ms['gateway']:.1f} ms wall ({LATENCY_MS} ms of it "
        f"simulated latency; {cpu['gateway']:.1f} ms CPU in the client: SDK, requests, breaker),\n"
        f"  audited transition + commit {ms['write']:.1f} ms wall ({cpu['write']:.1f} ms CPU in "
        "the client)."
    )

    exact = {
        key: run["requests"] == {name: n // 2 for name in FETCHES} for key, run in ours.items()
    }
    once = effects["refunds_created"] == n and not effects["duplicates"]
    print(
        f"\n  gateway requests: one refund fetch per refund ({n // 2:,} Razorpay + {n // 2:,} "
        f"Stripe), nothing else, in every run of ours: {verdict(all(exact.values()))}"
    )
    for key, ok in exact.items():
        if not ok:
            print(f"    {ours[key]['shape']}: {ours[key]['requests']}")
    print(
        f"  simulator effects: {effects['refunds_created']:,} refunds created (all by the setup), "
        f"{len(effects['duplicates'])} duplicates: {verdict(once)}"
    )

    finished = {key: run for key, run in ours.items() if run["finished"]}
    best = max(finished, key=lambda key: finished[key]["refunds_per_s"], default=None)
    if "procfile" in ours:
        row = summary["procfile"]
        print(
            f"\n  the Procfile's worker ({ours['procfile']['shape']}): "
            f"<= {TARGET_SECONDS:g} s {verdict(row['within_60s'])}, "
            f">= {TARGET_RATIO:g}x the baseline {verdict(row['ratio_pass'])} ({row['ratio']:.1f}x)"
        )
    if best is not None:
        row = summary[best]
        print(
            f"  the fastest shape ({ours[best]['shape']}): {ours[best]['seconds']:.1f} s, "
            f"<= {TARGET_SECONDS:g} s {verdict(row['within_60s'])}, "
            f">= {TARGET_RATIO:g}x the baseline {verdict(row['ratio_pass'])} ({row['ratio']:.1f}x)"
        )
    if sizes is QUICK:
        print("  (quick: sizes shrunk for a smoke run; the targets are set for the full run)")
    return {
        "shapes": summary,
        "best_shape": best,
        "one_fetch_per_refund": all(exact.values()),
        "no_duplicates": once,
        "baseline_extrapolated_s": round(whole, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument(
        "--shape",
        action="append",
        choices=list(SHAPES),
        help="run this worker shape (repeatable; default: procfile)",
    )
    args = parser.parse_args()
    urls = service_urls()
    if urls is None:
        return 2
    url, broker_url = urls
    sizes = QUICK if args.quick else FULL
    shapes = tuple(args.shape) if args.shape else sizes.shapes

    from workers.devtools.simulator import SimulatorServer

    with (
        SimulatorServer() as server,
        tempfile.TemporaryDirectory(prefix="backstop-bench-") as folder,
    ):
        # The baseline's adapters, in this process, read the settings the workers get; set
        # before anything reads the (cached) settings.
        os.environ.update(worker_env(server))
        from workers.db import get_engine
        from workers.db.migrate import upgrade

        upgrade(url)
        engine = get_engine()
        broker = redis.Redis.from_url(broker_url)
        print(f"backstop refund-retry bench ({'quick' if args.quick else 'full'})")
        results: dict[str, Any] = {"mode": "quick" if args.quick else "full"}
        results["machine"] = machine(engine, broker)
        backlog = seed_simulator(server.state, sizes.refunds)
        server.state.add_fault("*", "latency", latency_ms=LATENCY_MS)
        print(
            f"\nOne retry cycle over {sizes.refunds:,} refunds stuck PROCESSING for 2 h (half "
            f"Razorpay, half Stripe),\nsettled at the gateway; simulator in this process with "
            f"{LATENCY_MS} ms on every call; reloaded before every run"
        )
        logs = Path(folder)
        ours = {}
        for key in shapes:
            shape = SHAPES[key]
            print(f"  ours, {shape.label} ...", flush=True)
            ours[key] = run_ours(engine, broker, server, backlog, shape, sizes, logs, key)
        print(f"  baseline, sequential loop, on {sizes.baseline:,} of the refunds ...", flush=True)
        base = run_baseline(engine, broker, backlog, sizes.baseline)
        effects = server.state.effects()
        results["ours"], results["baseline"] = ours, base
        results["effects"] = {key: effects[key] for key in ("refunds_created", "duplicates")}
        results["summary"] = report(ours, base, sizes, results["effects"])
    if args.json:
        print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
