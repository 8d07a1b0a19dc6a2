"""Operator console benchmark on a real PostgreSQL and Redis: how fast its pages render over a
large database, beside the raw SQL of each page's main query measured in the same run, and how
fast a bulk replay by filter returns to the operator.

Setup, written with set-based SQL: N dead letters over 30 days (the full form: 1,000,000), 80%
closed (REPLAYED, DISCARDED, each with its audit row), 20% open (NEW, MANUAL_REVIEW, RETRYING)
over four tasks and their errors, 100,000 of them `holds.expire` letters in manual review (an
outage's backlog); 100,000 refunds (their payments, completions over 14 days in
the audit trail, 1% in manual review); 1,000 reconciliation runs with 10 findings each; 5,000
holds expired in the last hour. Then VACUUM ANALYZE.

1. Pages, rendered server-side by the console app (`workers.console.create_app`: auth, the
   queries, the templates), logged in as an operator, each requested ROUNDS times after a
   warm-up: the dead-letter list, a filtered list, one letter's page, the overview, the refunds
   page, a reconciliation run. Beside each, its main query run raw (psycopg2, the SQL the page
   sends) the same number of times. Target: p95 <= 150 ms per page.
2. Bulk replay by filter: the `holds.expire` letters in manual review; the operator's
   two requests (count and confirm) timed, target <= 2 s; then a real worker (consuming
   `default` only, so the replays stay countable in `critical`) runs `dlq.bulk` and the
   `dlq.dispatch` tasks it queues, and every letter's replay message is counted in Redis.

    .venv/bin/python -m tests.services -- .venv/bin/python bench/console.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, service_urls, settle, verdict  # noqa: E402
from tests import processes  # noqa: E402

PAGE_TARGET_MS = 150.0
BULK_TARGET_S = 2.0
PASSWORD = "bench-operator-password"

LOAD_SQL = [
    "TRUNCATE dead_letter_events, dead_letters, state_transitions, refunds, payments, "
    "booking_holds, reconciliation_discrepancies, reconciliation_runs, job_runs "
    "RESTART IDENTITY CASCADE",
    # Dead letters: 80% closed, 20% open; four tasks, each with its own error.
    """
    INSERT INTO dead_letters (task_name, task_id, payload, error_type, error_message, attempts,
        classification, status, created_at, updated_at, replays, rule)
    SELECT (ARRAY['holds.expire', 'refunds.submit', 'notifications.deliver',
                  'webhooks.process'])[t + 1],
        'bench-' || g,
        CASE t WHEN 0 THEN jsonb_build_object('hold_id', g)
               WHEN 1 THEN jsonb_build_object('refund_id', g)
               WHEN 2 THEN jsonb_build_object('notification_id', g)
               ELSE jsonb_build_object('provider', 'stripe', 'body', '{}',
                                       'signature', 'x') END,
        (ARRAY['TransientError','GatewayPermanent','ProviderError','SignatureInvalid'])[t + 1],
        'bench failure number ' || g,
        9,
        (ARRAY['TRANSIENT','PERMANENT','TRANSIENT','PERMANENT'])[t + 1],
        CASE WHEN g % 100 < 50 THEN 'REPLAYED' WHEN g % 100 < 80 THEN 'DISCARDED'
             WHEN g % 100 < 82 THEN 'NEW' WHEN g % 100 < 98 THEN 'MANUAL_REVIEW'
             ELSE 'RETRYING' END,
        now() - (g % 43200) * interval '1 minute',
        now() - (g % 43200) * interval '1 minute' + interval '5 minutes',
        1, 'bench'
    -- Five in eight letters in manual review are one task's (an outage's backlog, 100,000 of
    -- the full form's million: the bulk replay's selection); the rest spread over four.
    FROM (SELECT g, CASE WHEN g % 100 BETWEEN 82 AND 97 AND g % 8 < 5 THEN 0 ELSE g % 4 END AS t
          FROM generate_series(1, :letters) g) chosen
    """,
    """
    INSERT INTO state_transitions (entity, entity_id, from_status, to_status, actor, reason, at)
    SELECT 'dead_letters', id, 'RETRYING', status, 'bench', 'bench', updated_at
    FROM dead_letters WHERE status IN ('REPLAYED', 'DISCARDED')
    """,
    """
    INSERT INTO payments (gateway, gateway_payment_id, amount, currency, status)
    SELECT CASE WHEN g % 2 = 0 THEN 'stripe' ELSE 'razorpay' END, 'pay_' || g, 10000, 'USD',
        'COMPLETED'
    FROM generate_series(1, :refunds) g
    """,
    """
    INSERT INTO refunds (payment_id, amount, currency, status, attempts, requires_manual_review,
        idempotency_key, last_error, created_at, updated_at)
    SELECT g, 5000, 'USD',
        CASE WHEN g % 100 < 90 THEN 'COMPLETED' WHEN g % 100 < 95 THEN 'FAILED'
             WHEN g % 100 < 98 THEN 'PROCESSING' ELSE 'PENDING' END,
        1 + g % 3, g % 100 = 93, 'refund-' || g || '-1',
        CASE WHEN g % 100 BETWEEN 90 AND 94 THEN 'gateway says failed' END,
        now() - (g % 20160) * interval '1 minute',
        now() - (g % 20160) * interval '1 minute'
    FROM generate_series(1, :refunds) g
    """,
    """
    INSERT INTO state_transitions (entity, entity_id, from_status, to_status, actor, reason, at)
    SELECT 'refunds', id, 'PROCESSING', status, 'bench', 'bench', updated_at
    FROM refunds WHERE status IN ('COMPLETED', 'FAILED')
    """,
    """
    INSERT INTO reconciliation_runs (gateway, window_start, window_end, status, started_at,
        finished_at, counts, actor)
    SELECT CASE WHEN g % 2 = 0 THEN 'stripe' ELSE 'razorpay' END,
        date_trunc('day', now()) - (g / 2 + 1) * interval '1 day',
        date_trunc('day', now()) - (g / 2) * interval '1 day',
        'COMPLETED', now() - g * interval '1 hour', now() - g * interval '1 hour' + interval '40 s',
        '{"payments": 20000, "fixed": 3, "flagged": 7}', 'reconciliation.nightly'
    FROM generate_series(1, :runs) g
    """,
    """
    INSERT INTO reconciliation_discrepancies (run_id, type, gateway_payment_id, details, fixed)
    SELECT r, (ARRAY['MISSING_IN_DB', 'STATUS_MISMATCH', 'AMOUNT_MISMATCH',
                     'MISSING_AT_GATEWAY'])[k % 4 + 1],
        'pay_' || r || '_' || k, '{"ours": "PENDING", "theirs": "captured"}', k < 3
    FROM generate_series(1, :runs) r, generate_series(0, 9) k
    """,
    """
    INSERT INTO booking_holds (resource_id, user_id, start_time, end_time, expires_at, status)
    SELECT 'r' || g, 'u' || g, now() + interval '1 day', now() + interval '2 days',
        now() - (g % 3600) * interval '1 second', 'EXPIRED'
    FROM generate_series(1, 5000) g
    """,
    """
    INSERT INTO state_transitions (entity, entity_id, from_status, to_status, actor, reason, at)
    SELECT 'booking_holds', id, 'ACTIVE', 'EXPIRED', 'bench', NULL,
        expires_at + (id % 3) * interval '1 second'
    FROM booking_holds
    """,
]


def load(engine: Engine, broker: redis.Redis, letters: int, refunds: int, runs: int) -> float:
    started = time.perf_counter()
    with engine.begin() as conn:
        for sql in LOAD_SQL:
            conn.execute(text(sql), {"letters": letters, "refunds": refunds, "runs": runs})
    settle(engine)
    broker.flushdb()
    return time.perf_counter() - started


def percentile(samples: list[float], share: float) -> float:
    ordered = sorted(samples)
    return ordered[min(int(len(ordered) * share), len(ordered) - 1)]


def timed(call: Callable[[], Any], rounds: int, warm: int = 3) -> list[float]:
    for _ in range(warm):
        call()
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def console_client() -> Any:
    from config.settings import load_settings
    from workers.console import create_app
    from workers.console.auth import hash_password

    settings = load_settings(
        CONSOLE_USERS=f"bench:operator:{hash_password(PASSWORD)}",
        CONSOLE_SECRET_KEY="bench-console-secret",
        CONSOLE_COOKIE_SECURE=False,
    )
    client = create_app(settings).test_client()
    page = client.get("/login").get_data(as_text=True)
    done = client.post(
        "/login", data={"username": "bench", "password": PASSWORD, "csrf_token": csrf(page)}
    )
    assert done.status_code == 302, done.status_code
    return client


def csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF token"
    return found.group(1)


def raw(engine: Engine, statement: Any) -> Callable[[], Any]:
    """The statement as the page sends it, run on a bare DBAPI cursor."""
    sql = str(statement.compile(engine, compile_kwargs={"literal_binds": True}))
    connection = engine.raw_connection()

    def run() -> Any:
        cursor = connection.cursor()
        cursor.execute(sql)
        rows = cursor.fetchall()
        cursor.close()
        return rows

    return run


def page_queries(engine: Engine, letter_id: int, run_id: int) -> dict[str, Any]:
    """Each page's main query, built by the code the page calls."""
    from datetime import timedelta

    from sqlalchemy import select

    from workers.dlq.browse import Filters, groups_query
    from workers.dlq.replay import OPEN
    from workers.models import DeadLetter
    from workers.observability.health import OPEN_LETTERS
    from workers.reconciliation.review import FindingFilters, findings_query
    from workers.refunds.review import needing_a_person, page_query

    now = datetime.now(UTC)
    return {
        "dead-letter list": groups_query(Filters(statuses=OPEN).select(now)),
        "filtered list": groups_query(
            Filters(task="refunds.*", statuses=("MANUAL_REVIEW",), error="bench").select(now)
        ),
        "a letter's page": select(DeadLetter).where(DeadLetter.id == letter_id),
        "overview": OPEN_LETTERS,  # the slowest of its reads, which run at once
        "refunds page": page_query(needing_a_person(now, timedelta(hours=1)), limit=50),
        "a reconciliation run": findings_query(run_id, FindingFilters(), limit=100),
    }


def run_pages(engine: Engine, rounds: int) -> list[dict[str, Any]]:
    client = console_client()
    with engine.connect() as conn:
        letter_id = conn.execute(
            text("SELECT id FROM dead_letters WHERE status = 'MANUAL_REVIEW' ORDER BY id LIMIT 1")
        ).scalar_one()
        run_id = conn.execute(text("SELECT max(id) FROM reconciliation_runs")).scalar_one()
    paths = {
        "dead-letter list": "/dead-letters",
        "filtered list": "/dead-letters?task=refunds.*&status=MANUAL_REVIEW&error=bench",
        "a letter's page": f"/dead-letters/{letter_id}",
        "overview": "/",
        "refunds page": "/refunds",
        "a reconciliation run": f"/reconciliation/{run_id}",
    }
    queries = page_queries(engine, letter_id, run_id)
    results = []
    for name, path in paths.items():

        def get(path: str = path) -> None:
            response = client.get(path)
            assert response.status_code == 200, (path, response.status_code)

        page = timed(get, rounds)
        query = timed(raw(engine, queries[name]), rounds)
        results.append(
            {
                "page": name,
                "path": path,
                "p50_ms": round(statistics.median(page), 1),
                "p95_ms": round(percentile(page, 0.95), 1),
                "sql_p50_ms": round(statistics.median(query), 1),
                "sql_p95_ms": round(percentile(query, 0.95), 1),
            }
        )
    return results


def run_bulk(engine: Engine, broker: redis.Redis, logs: Path) -> dict[str, Any]:
    """The operator's count and confirm of a bulk replay by filter, then the worker's share."""
    client = console_client()
    with engine.connect() as conn:
        chosen = conn.execute(
            text(
                "SELECT count(*) FROM dead_letters "
                "WHERE task_name = 'holds.expire' AND status = 'MANUAL_REVIEW'"
            )
        ).scalar_one()
    listing = "/dead-letters?task=holds.expire&status=MANUAL_REVIEW"
    token = csrf(client.get(listing).get_data(as_text=True))
    form = {
        "task": "holds.expire",
        "status": "MANUAL_REVIEW",
        "action": "replay",
        "reason": "bench: the outage is over",
        "csrf_token": token,
    }
    started = time.perf_counter()
    counted = client.post("/dead-letters/bulk", data=form)
    count_s = time.perf_counter() - started
    html = counted.get_data(as_text=True)
    assert counted.status_code == 200, counted.status_code
    confirm = dict(
        re.findall(r'name="([a-z_]+)" value="([^"]*)"', html.split('class="confirm"')[1])
    )
    started = time.perf_counter()
    done = client.post("/dead-letters/bulk", data={**confirm, "csrf_token": csrf(html)})
    confirm_s = time.perf_counter() - started
    assert done.status_code == 302, done.status_code
    shown = int(confirm["count"])
    worker = processes.worker(
        "bench-console",
        {**os.environ, "PYTHONUNBUFFERED": "1"},
        logs / "worker.log",
        "--prefetch-multiplier=1",
        "-O",
        "fair",
        queues="default",
        concurrency=os.cpu_count() or 2,
    )
    try:
        started = time.perf_counter()
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            decided = bulk_state(engine)
            if decided["waiting"] == 0 and broker.llen("critical") >= decided["retrying"]:
                break
            time.sleep(0.1)
        dispatched_s = time.perf_counter() - started
    finally:
        worker.stop()
    decided = bulk_state(engine)
    return {
        "selected": chosen,
        "shown": shown,
        "count_s": round(count_s, 3),
        "confirm_s": round(confirm_s, 3),
        "operator_s": round(count_s + confirm_s, 3),
        "worker_s": round(dispatched_s, 2),
        **decided,
        "replay_messages": broker.llen("critical"),
    }


def bulk_state(engine: Engine) -> dict[str, int]:
    """The bulk replay's letters: still waiting, replayed (RETRYING, their second replay),
    closed as unnecessary by the precheck, and the operator's events on them."""
    with engine.connect() as conn:
        row = conn.execute(
            text(
                """
                SELECT count(*) FILTER (WHERE status = 'MANUAL_REVIEW'),
                       count(*) FILTER (WHERE status = 'RETRYING' AND replays = 2),
                       count(*) FILTER (WHERE status = 'DISCARDED'
                                          AND resolution LIKE 'replay unnecessary:%'),
                       (SELECT count(*) FROM dead_letter_events
                        WHERE actor = 'bench' AND action IN ('replayed', 'replay_unnecessary'))
                FROM dead_letters WHERE task_name = 'holds.expire'
                """
            )
        ).one()
    return {"waiting": row[0], "retrying": row[1], "unnecessary": row[2], "events": row[3]}


def report(pages: list[dict[str, Any]], bulk: dict[str, Any]) -> dict[str, Any]:
    print(
        f"\n  {'page':<22}{'p50 ms':>8}{'p95 ms':>8}{'main SQL p50':>14}{'p95':>7}   p95 <= 150 ms"
    )
    pages_ok = True
    for row in pages:
        ok = row["p95_ms"] <= PAGE_TARGET_MS
        pages_ok &= ok
        print(
            f"  {row['page']:<22}{row['p50_ms']:>8.1f}{row['p95_ms']:>8.1f}"
            f"{row['sql_p50_ms']:>14.1f}{row['sql_p95_ms']:>7.1f}   {verdict(ok)}"
        )
    bulk_ok = bulk["operator_s"] <= BULK_TARGET_S
    decided = bulk["retrying"] + bulk["unnecessary"]
    complete = (
        bulk["waiting"] == 0
        and decided == bulk["shown"] == bulk["events"]
        and bulk["retrying"] == bulk["replay_messages"]
    )
    print(
        f"\n  bulk replay of {bulk['shown']:,} letters by filter: count {bulk['count_s']:.2f} s + "
        f"confirm {bulk['confirm_s']:.2f} s = {bulk['operator_s']:.2f} s to the operator "
        f"(<= {BULK_TARGET_S:g} s): {verdict(bulk_ok)}"
    )
    print(
        f"  then dlq.bulk and dlq.dispatch on one worker: every letter decided and every replay "
        f"message in Redis after {bulk['worker_s']:.1f} s; {bulk['retrying']:,} replayed "
        f"(RETRYING) + {bulk['unnecessary']:,} unnecessary (the hold already final) = "
        f"{decided:,} of {bulk['shown']:,} shown, {bulk['events']:,} events as the operator, "
        f"{bulk['replay_messages']:,} replay messages: {verdict(complete)}"
    )
    return {"pages_ok": pages_ok, "bulk_ok": bulk_ok, "complete": complete}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 letters, for a smoke run")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()
    urls = service_urls()
    if urls is None:
        return 2
    url, broker_url = urls
    letters, refunds, runs, rounds = (
        (20_000, 5_000, 50, 10) if args.quick else (1_000_000, 100_000, 1_000, 40)
    )
    from workers import celery_app  # noqa: F401  (the bulk replay is sent through the app)
    from workers.db import get_engine
    from workers.db.migrate import upgrade

    upgrade(url)
    engine = get_engine()
    broker = redis.Redis.from_url(broker_url)
    print(f"backstop operator console bench ({'quick' if args.quick else 'full'})")
    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "machine": machine(engine, broker),
    }
    loaded = load(engine, broker, letters, refunds, runs)
    print(
        f"\nloaded {letters:,} dead letters, {refunds:,} refunds, {runs:,} reconciliation runs "
        f"in {loaded:.0f} s; each page requested {rounds} times after 3 warm-ups"
    )
    results["pages"] = run_pages(engine, rounds)
    with tempfile.TemporaryDirectory(prefix="backstop-bench-") as folder:
        results["bulk"] = run_bulk(engine, broker, Path(folder))
    results["summary"] = report(results["pages"], results["bulk"])
    if args.json:
        print(json.dumps(results, default=str))
    ok = results["summary"]["complete"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
