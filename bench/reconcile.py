"""Reconciliation benchmark: one day of 100,000 and of 1,000,000 gateway payments reconciled
with the database, on a real PostgreSQL, against the gateway simulator over HTTP with the
official SDKs, compared with the seeds' one-query-per-payment loop on the 100,000 set.

Setup, per gateway and size: the simulator holds N payments spread over 2026-05-04 (UTC) and
the database their counterparts, with known differences: 0.1% PENDING here but captured there
(the safe fix), 0.05% each COMPLETED here but failed there (flagged, never moved back), a
different amount, missing here; and N/10,000 payments here the gateway never saw. Both are
loaded set-based; the database is vacuumed and checkpointed before every run.

1. Ours: `backstop reconcile --gateway G --from 2026-05-04 --json`, the product's command,
   as a child process: hourly slices paged RECONCILE_CONCURRENCY at a time, one query and one
   commit per batch of pages. Its report must name exactly the seeded differences.
2. Listing alone, for the ceiling: the same hourly slices paged by the product's `Lister`
   with the same threads and SDKs, each page's columns read, and nothing else: no database.
   No reconciliation through these SDKs from this simulator on this machine can be faster.
3. Baseline, the seeds' approach (`reconcileInBatches` with `findFirst` per payment): pages
   read one after the other, then for each payment one ORM query by gateway payment id, a
   transition and a discrepancy row where they differ; one commit per page (kinder than the
   seeds, which commit per statement). Also a child process.

Measured for each: payments/s (over the run itself, without the process's start), the peak RSS
of the reconciling process (the child's, from wait4; the simulator runs in this process and is
not in it), and CPU seconds of the child, the simulator and Postgres. From those: the CPU per
payment of all three together (the child's less what starting a child costs, measured apart),
and the ratio to the baseline the machine's CPUs would allow at that cost if they never waited.

Targets: ours >= 20x the baseline's payments/s on the 100,000 set; ours' peak RSS at 1,000,000
<= 1.2x its peak RSS at 100,000.

    .venv/bin/python -m tests.services -- .venv/bin/python bench/reconcile.py [--quick] [--json]

`--quick` shrinks the sizes (10,000 / 100,000, baseline on 10,000) for a smoke run;
`--gateway` (repeatable) picks the gateways (default both); `--latency-ms` adds that much to
every simulator response. A missed target prints FAIL but the exit code stays 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, service_urls, settle, verdict  # noqa: E402

DAY = "2026-05-04"
START = datetime(2026, 5, 4, tzinfo=UTC)
TARGET_RATIO = 20.0
TARGET_RSS = 1.2
CLK_TCK = os.sysconf("SC_CLK_TCK")
PREFIX = {"razorpay": ("pay_", 14), "stripe": ("pi_", 24)}
CURRENCY = {"razorpay": "INR", "stripe": "usd"}
CAPTURED = {"razorpay": "captured", "stripe": "succeeded"}
FAILED = {"razorpay": "failed", "stripe": "canceled"}


@dataclass(frozen=True)
class Sizes:
    small: int
    large: int
    baseline: int


FULL = Sizes(small=100_000, large=1_000_000, baseline=100_000)
QUICK = Sizes(small=10_000, large=100_000, baseline=10_000)


# -- the data -------------------------------------------------------------------------------------


def gateway_id(gateway: str, n: int) -> str:
    prefix, width = PREFIX[gateway]
    return f"{prefix}{n:0{width}d}"


def created(n: int, size: int) -> int:
    return int(START.timestamp()) + (n - 1) * 86_400 // size


def expected(size: int) -> dict[str, int]:
    """The differences seeded into a set of `size` payments (see `load_database`)."""
    ns = range(1, size + 1)
    return {
        "fixed": sum(1 for n in ns if n % 1000 == 1),
        "STATUS_MISMATCH": sum(1 for n in ns if n % 1000 == 1 or n % 2000 == 2),
        "AMOUNT_MISMATCH": sum(1 for n in ns if n % 2000 == 3),
        "MISSING_IN_DB": sum(1 for n in ns if n % 2000 == 4),
        "MISSING_AT_GATEWAY": size // 10_000,
        "payments": size,
    }


def load_simulator(state: Any, gateway: str, size: int) -> None:
    state.reset()
    rows = (
        {
            "id": gateway_id(gateway, n),
            "amount": 10_000,
            "currency": CURRENCY[gateway],
            "status": FAILED[gateway] if n % 2000 == 2 else CAPTURED[gateway],
            "created": created(n, size),
        }
        for n in range(1, size + 1)
    )
    state.add_payments(gateway, rows)


PAYMENTS_SQL = """
INSERT INTO payments (gateway, gateway_payment_id, amount, currency, status, created_at,
                      updated_at)
SELECT :gateway, :prefix || lpad(n::text, :width, '0'),
       CASE WHEN n % 2000 = 3 THEN 9999 ELSE 10000 END,
       :currency,
       CASE WHEN n % 1000 = 1 THEN 'PENDING' ELSE 'COMPLETED' END,
       to_timestamp(:start + (n - 1)::bigint * 86400 / :size), now()
FROM generate_series(1, :size) AS n
WHERE n % 2000 <> 4
UNION ALL
SELECT :gateway, :prefix || 'ghost' || lpad(g::text, :width - 5, '0'), 10000, :currency,
       'COMPLETED', to_timestamp(:start + g::bigint * 86400 / (:size / 10000 + 1)), now()
FROM generate_series(1, :size / 10000) AS g
"""


def load_database(engine: Engine, gateway: str, size: int) -> None:
    prefix, width = PREFIX[gateway]
    with engine.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE payments, refunds, state_transitions, reconciliation_runs, "
                "reconciliation_discrepancies, reconciliation_seen, notifications, job_runs "
                "RESTART IDENTITY CASCADE"
            )
        )
        conn.execute(
            text(PAYMENTS_SQL),
            {
                "gateway": gateway,
                "prefix": prefix,
                "width": width,
                "currency": CURRENCY[gateway].upper(),
                "start": int(START.timestamp()),
                "size": size,
            },
        )
    settle(engine, "payments")


# -- measuring a child ----------------------------------------------------------------------------


def _stat(pid: int | str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            raw = stat.read()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


POSTMASTER: list[int] = []


def postgres_cpu() -> float:
    """CPU seconds of our PostgreSQL (other clusters may run on the machine): its postmaster,
    the backends that ended (its cutime/cstime), and those still running."""
    if not POSTMASTER:
        return 0.0
    root = POSTMASTER[0]
    fields = _stat(root)
    total = sum(int(value) for value in fields[11:15]) if fields else 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (child := _stat(entry.name)) and int(child[1]) == root:
            total += int(child[11]) + int(child[12])
    return total / CLK_TCK


def find_postmaster(engine: Engine) -> None:
    with engine.connect() as conn:
        backend = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    fields = _stat(backend)
    if fields:
        POSTMASTER[:] = [int(fields[1])]


def simulator_cpu() -> float:
    """This process's CPU less its main thread's: the simulator's request threads."""
    times = os.times()
    return times.user + times.system - time.thread_time()


# The reconciling process reports its own peak RSS as it exits. wait4's ru_maxrss would not
# do: exec records the RSS of the process it replaces, here a fork of this one, which holds
# the simulator's million payments.
PEAK = (
    "import atexit, sys; atexit.register(lambda: print('peak_rss_kb', *[line.split()[1] "
    "for line in open('/proc/self/status') if line.startswith('VmHWM')], file=sys.stderr))"
)


def spawn(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run a reconciling process whose last line of output is JSON; returns that, with the
    process's wall time, CPU and peak RSS (from wait4: communicate() would reap the child
    and lose its rusage) and the simulator's and Postgres' CPU meanwhile."""
    pg0, sim0 = postgres_cpu(), simulator_cpu()
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=errors, text=True
        )
        assert proc.stdout is not None
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        errors.seek(0)
        stderr = errors.read()
        if proc.returncode != 0:
            raise SystemExit(f"bench: {' '.join(argv[2:6])} failed:\n{stderr[-3000:]}")
    peak = [line.split()[1] for line in stderr.splitlines() if line.startswith("peak_rss_kb")]
    if not peak:
        raise SystemExit(f"bench: no peak RSS reported:\n{stderr[-2000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["process"] = {
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(int(peak[-1]) / 1024, 1),
    }
    result["others_cpu_s"] = {
        "simulator": round(simulator_cpu() - sim0, 2),
        "postgres": round(postgres_cpu() - pg0, 2),
    }
    return result


# -- ours and the baseline ------------------------------------------------------------------------


def child_env(server: Any) -> dict[str, str]:
    return {
        **os.environ,
        **server.gateway_env(),
        "TIMEZONE": "UTC",
        "PYTHONUNBUFFERED": "1",
    }


def run_ours(engine: Engine, server: Any, gateway: str, size: int) -> dict[str, Any]:
    load_simulator(server.state, gateway, size)
    load_database(engine, gateway, size)
    result = spawn(
        [
            sys.executable,
            "-c",
            f"{PEAK}; from workers.cli import main; sys.exit(main())",
            "reconcile",
            "--gateway",
            gateway,
            "--from",
            DAY,
            "--json",
        ],
        child_env(server),
    )
    (run,) = result["runs"]
    seconds = (
        datetime.fromisoformat(run["finished_at"]) - datetime.fromisoformat(run["started_at"])
    ).total_seconds()
    counts = run["counts"]
    want = expected(size)
    return {
        "gateway": gateway,
        "payments": size,
        "seconds": round(seconds, 2),
        "payments_per_s": round(size / seconds),
        "pages": counts["pages"],
        "counts": {key: counts.get(key, 0) for key in want},
        "correct": run["outcome"] == "completed"
        and all(counts.get(k, 0) == v for k, v in want.items()),
        **{key: result[key] for key in ("process", "others_cpu_s")},
    }


def spawn_self(role: str, gateway: str, server: Any) -> dict[str, Any]:
    """This script again, as the child that plays `role` (`--baseline-child`, ...)."""
    return spawn(
        [
            sys.executable,
            "-c",
            f"{PEAK}; sys.argv[0] = {str(Path(__file__).resolve())!r}; "
            "import runpy; runpy.run_path(sys.argv[0], run_name='__main__')",
            role,
            gateway,
        ],
        child_env(server),
    )


def run_baseline(engine: Engine, server: Any, gateway: str, size: int) -> dict[str, Any]:
    load_simulator(server.state, gateway, size)
    load_database(engine, gateway, size)
    result = spawn_self("--baseline-child", gateway, server)
    return {
        "gateway": gateway,
        "payments": result["payments"],
        "seconds": result["seconds"],
        "payments_per_s": round(result["payments"] / result["seconds"]),
        "queries": result["queries"],
        "ms_per_payment": result["ms_per_payment"],
        **{key: result[key] for key in ("process", "others_cpu_s")},
    }


STARTUP = (
    "import workers.cli, workers.reconciliation.run, workers.gateways.razorpay, "
    "workers.gateways.stripe; print('{}')"
)


def startup_cpu(server: Any) -> float:
    """The CPU seconds a child spends starting (its imports), the most of three tries: taken
    off the children's CPU, it leaves what their runs cost, if anything a little too little."""
    return max(
        spawn([sys.executable, "-c", f"{PEAK}; {STARTUP}"], child_env(server))["process"]["cpu_s"]
        for _ in range(3)
    )


def run_listing(server: Any, gateway: str, size: int) -> dict[str, Any]:
    load_simulator(server.state, gateway, size)
    result = spawn_self("--listing-child", gateway, server)
    return {
        "gateway": gateway,
        "payments": result["payments"],
        "seconds": result["seconds"],
        "payments_per_s": round(result["payments"] / result["seconds"]),
        **{key: result[key] for key in ("process", "others_cpu_s")},
    }


def listing_child(gateway: str) -> None:
    """The window's pages read the way a run reads them, and nothing done with them."""
    from config.settings import get_settings
    from workers.gateways.registry import get_gateway
    from workers.reconciliation.listing import Lister
    from workers.reconciliation.run_records import slices_of

    settings = get_settings()
    adapter = get_gateway(gateway).adapter  # type: ignore[attr-defined]
    slices = slices_of(START, START + timedelta(days=1))
    state = [[None, False] for _ in slices]
    lister = Lister(
        adapter, slices, state, settings.RECONCILE_CONCURRENCY, settings.RECONCILE_BATCH_PAGES
    )
    payments = 0
    started = time.perf_counter()
    for batch in lister.batches():
        payments += sum(len(page.columns().ids) for _, page in batch)
    seconds = time.perf_counter() - started
    print(json.dumps({"payments": payments, "seconds": round(seconds, 2)}))


def every_page(adapter: Any, start: datetime, end: datetime) -> Iterator[list[Any]]:
    """The payments of [start, end), one page after the other, as the seeds' loop reads them."""
    cursor = None
    while True:
        page = adapter.payment_page(start, end, cursor)
        yield page.items
        if page.cursor is None:
            return
        cursor = page.cursor


def baseline_child(gateway: str) -> None:
    """The seeds' reconciliation: page after page, then one query per payment."""
    from sqlalchemy import insert, select

    from workers.base import utcnow
    from workers.db import new_session, transition
    from workers.db.transitions import MACHINES
    from workers.gateways.registry import get_gateway
    from workers.models import Payment, ReconciliationDiscrepancy, ReconciliationRun
    from workers.reconciliation import gateway_status

    adapter = get_gateway(gateway).adapter  # type: ignore[attr-defined]
    session = new_session()
    run_id = session.execute(
        insert(ReconciliationRun)
        .values(gateway=gateway, window_start=START, window_end=START + timedelta(days=1))
        .returning(ReconciliationRun.id)
    ).scalar_one()
    session.commit()
    payments = queries = 0
    wall = {"gateway": 0.0, "database": 0.0}
    started = time.perf_counter()
    for page in every_page(adapter, START, START + timedelta(days=1)):
        t0 = time.perf_counter()
        for listed in page:
            payments += 1
            queries += 1
            row = session.execute(
                select(Payment).where(Payment.gateway_payment_id == listed.id)
            ).scalar_one_or_none()
            theirs = gateway_status(gateway, listed)
            kind = None
            if row is None:
                kind = "MISSING_IN_DB"
            elif row.amount != listed.amount:
                kind = "AMOUNT_MISMATCH"
            elif row.status != theirs:
                kind = "STATUS_MISMATCH"
                if row.status in MACHINES["payments"].get(theirs, frozenset()):
                    transition(
                        session,
                        "payments",
                        row.id,
                        theirs,
                        actor="bench.seeds",
                        reason="reconciliation",
                        now=utcnow(),
                    )
            if kind is not None:
                session.execute(
                    insert(ReconciliationDiscrepancy).values(
                        run_id=run_id,
                        type=kind,
                        payment_id=row.id if row is not None else None,
                        gateway_payment_id=listed.id,
                    )
                )
        session.commit()
        wall["database"] += time.perf_counter() - t0
    seconds = time.perf_counter() - started
    wall["gateway"] = seconds - wall["database"]
    print(
        json.dumps(
            {
                "payments": payments,
                "queries": queries,
                "seconds": round(seconds, 2),
                "ms_per_payment": {
                    k: round(1000 * v / max(payments, 1), 3) for k, v in wall.items()
                },
            }
        )
    )


# -- report ---------------------------------------------------------------------------------------


def cpu_per_payment(run: dict[str, Any], startup: float) -> float:
    """Microseconds of CPU per payment of the child (after its start), the simulator and
    Postgres together."""
    others = run["others_cpu_s"]["simulator"] + run["others_cpu_s"]["postgres"]
    return 1e6 * (max(run["process"]["cpu_s"] - startup, 0.0) + others) / run["payments"]


def report(results: dict[str, Any], sizes: Sizes, startup: float) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    cpus = os.cpu_count() or 1
    print(
        f"\n  {'gateway':<9}{'approach':<26}{'payments':>10}{'seconds':>9}{'payments/s':>12}"
        f"{'peak RSS':>10}{'CPU s':>7}{'sim s':>7}{'pg s':>7}  correct"
    )
    for gateway, runs in results.items():
        for label, run in runs.items():
            process, others = run["process"], run["others_cpu_s"]
            correct = verdict(run["correct"]) if "correct" in run else "-"
            print(
                f"  {gateway:<9}{label:<26}{run['payments']:>10,}{run['seconds']:>9.2f}"
                f"{run['payments_per_s']:>12,}{process['peak_rss_mb']:>8.1f}MB"
                f"{process['cpu_s']:>7.1f}{others['simulator']:>7.1f}{others['postgres']:>7.1f}"
                f"  {correct}"
            )
        small, large, base = runs["ours, small"], runs["ours, large"], runs["seeds' loop, small"]
        ratio = small["payments_per_s"] / base["payments_per_s"]
        ceiling = runs["listing alone, small"]["payments_per_s"] / base["payments_per_s"]
        rss = large["process"]["peak_rss_mb"] / small["process"]["peak_rss_mb"]
        # What the machine allows at what the pages and the comparison cost in CPU: all the
        # CPUs busy all the time, no waiting on one another.
        costs = {
            "ours": cpu_per_payment(large, startup),
            "listing alone": cpu_per_payment(runs["listing alone, small"], startup),
        }
        bounds = {key: cpus * 1e6 / cost / base["payments_per_s"] for key, cost in costs.items()}
        summary[gateway] = {
            "ratio": round(ratio, 1),
            "ratio_pass": ratio >= TARGET_RATIO,
            "listing_alone_ratio": round(ceiling, 1),
            "rss_ratio": round(rss, 3),
            "rss_pass": rss <= TARGET_RSS,
            "correct": small["correct"] and large["correct"],
            "cpu_us_per_payment": {key: round(cost, 1) for key, cost in costs.items()},
            "cpu_bound_ratio": {key: round(bound, 1) for key, bound in bounds.items()},
        }
        print(
            f"  {gateway}: ours / seeds' loop on {sizes.small:,} = {ratio:.1f}x "
            f"(>= {TARGET_RATIO:g}x {verdict(ratio >= TARGET_RATIO)}); peak RSS "
            f"{sizes.large:,} / {sizes.small:,} = {rss:.3f} (<= {TARGET_RSS} "
            f"{verdict(rss <= TARGET_RSS)}); reports name exactly the seeded differences: "
            f"{verdict(summary[gateway]['correct'])}"
        )
        print(
            f"  {gateway}: listing alone (no database) / seeds' loop = {ceiling:.1f}x: the most "
            "any reconciliation reading these pages could reach here"
        )
        print(
            f"  {gateway}: CPU per payment, the run's process (less {startup:.1f} s of start), the "
            f"simulator and Postgres together: ours {costs['ours']:.0f} us ({sizes.large:,}), "
            f"listing alone {costs['listing alone']:.0f} us; at those costs {cpus} CPUs kept "
            f"busy all the time would reach {bounds['ours']:.1f}x and "
            f"{bounds['listing alone']:.1f}x the seeds' loop"
        )
        ms = base["ms_per_payment"]
        print(
            f"  {gateway}: seeds' loop per payment: {ms['database']:.3f} ms in the database "
            f"(one query), {ms['gateway']:.3f} ms reading pages"
        )
    print(
        "  peak RSS: of the reconciling process (the CLI, or the baseline's child); the "
        "simulator runs in the bench's own process."
    )
    if sizes is QUICK:
        print("  (quick: sizes shrunk for a smoke run; the targets are set for the full run)")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--gateway", action="append", choices=["razorpay", "stripe"])
    parser.add_argument("--latency-ms", type=int, default=0)
    parser.add_argument("--baseline-child", metavar="GATEWAY", help=argparse.SUPPRESS)
    parser.add_argument("--listing-child", metavar="GATEWAY", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_child:
        baseline_child(args.baseline_child)
        return 0
    if args.listing_child:
        listing_child(args.listing_child)
        return 0
    urls = service_urls()
    if urls is None:
        return 2
    url, broker_url = urls
    sizes = QUICK if args.quick else FULL
    gateways = args.gateway or ["razorpay", "stripe"]

    from workers.db import make_engine
    from workers.db.migrate import upgrade
    from workers.devtools.simulator import SimulatorServer

    upgrade(url)
    engine = make_engine(url)
    find_postmaster(engine)
    broker = redis.Redis.from_url(broker_url)
    print(f"backstop reconciliation bench ({'quick' if args.quick else 'full'})")
    results: dict[str, Any] = {"mode": "quick" if args.quick else "full"}
    results["machine"] = machine(engine, broker)
    runs: dict[str, dict[str, Any]] = {}
    with SimulatorServer() as server:
        if args.latency_ms:
            server.state.add_fault("*", "latency", latency_ms=args.latency_ms)
        print(
            f"\nOne day of payments per gateway, simulator in this process"
            f"{f' with {args.latency_ms} ms on every call' if args.latency_ms else ''}, "
            f"RECONCILE_CONCURRENCY={os.environ.get('RECONCILE_CONCURRENCY', '4')}"
        )
        for gateway in gateways:
            runs[gateway] = {}
            for label, size in (("ours, small", sizes.small), ("ours, large", sizes.large)):
                print(f"  {gateway}: {label} ({size:,}) ...", flush=True)
                runs[gateway][label] = run_ours(engine, server, gateway, size)
            print(f"  {gateway}: listing alone ({sizes.small:,}) ...", flush=True)
            runs[gateway]["listing alone, small"] = run_listing(server, gateway, sizes.small)
            print(f"  {gateway}: seeds' loop ({sizes.baseline:,}) ...", flush=True)
            runs[gateway]["seeds' loop, small"] = run_baseline(
                engine, server, gateway, sizes.baseline
            )
        startup = startup_cpu(server)
    results["runs"] = runs
    results["startup_cpu_s"] = startup
    results["summary"] = report(runs, sizes, startup)
    if args.json:
        print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
