"""Dead-letter triage benchmark on a real PostgreSQL and Redis: one triage run over a large
dead-letter table, beside the naive one-letter-at-a-time loop, in the same run.

Setup: N dead letters written with set-based SQL, in the mix an incident leaves behind:
25% transient and young (`holds.expire` of ACTIVE holds: replayed, their precheck reading the
holds, each replay sent to Redis), 25% transient but older than DLQ_MANUAL_AFTER_SECONDS
(manual review), 20% permanent (manual review), 10% invalid payloads (manual review), 10%
`holds.expire` of holds that do not exist (discarded by rule), 5% unknown outcomes (manual
review) and 5% transient `refunds.submit` of COMPLETED refunds (precheck: unnecessary). The
table is reloaded, vacuumed and checkpointed, and Redis flushed, before each run.

1. Ours: `workers.dlq.triage.triage` (rules, SKIP LOCKED batches of DLQ_TRIAGE_BATCH, one audited
   batch transition per decision, batch prechecks, replays sent after each commit).
2. Baseline: the naive loop: for each NEW letter, read it, match the rules, run the precheck for
   that letter, update it with its audit row, send its replay, commit; on a subset,
   extrapolated.

Target: ours <= 10 s for 100,000 letters. Checked: every letter decided exactly as the rules
say, one replay message per replayed letter and no other.

3. Then an operator replays N letters in manual review (`dlq replay --all`; the table reloaded
   with N + subset letters of the same mix, all in MANUAL_REVIEW): the per-letter path it used
   to take, on the subset, beside the batched one (`workers.dlq.bulk`) on the N others, in this
   process: decisions committed, events written and `dlq.dispatch` tasks queued. Target: >= 20x,
   and N = 100,000 letters in <= 10 s.

    .venv/bin/python -m tests.services -- .venv/bin/python bench/dlq.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, service_urls, settle  # noqa: E402
from tests import processes  # noqa: E402

TARGET_SECONDS = 10.0
QUEUES = ("critical", "default", "notifications", "batch")

# (share, task, error_type, classification, message, payload kind, age)
MIX = [
    (25, "holds.expire", "TransientError", "TRANSIENT", "database busy", "active_hold", "young"),
    (25, "holds.expire", "TransientError", "TRANSIENT", "database busy", "active_hold", "old"),
    (
        20,
        "refunds.submit",
        "GatewayPermanent",
        "PERMANENT",
        "stripe: card_declined",
        "refund",
        "young",
    ),
    (10, "holds.expire", "PayloadError", "PERMANENT", "invalid payload: hold_id", "bad", "young"),
    (
        10,
        "holds.expire",
        "NotFound",
        "PERMANENT",
        "booking_holds does not exist",
        "no_hold",
        "young",
    ),
    (
        5,
        "refunds.submit",
        "OutcomeUnknown",
        "UNKNOWN",
        "stripe: connection lost",
        "refund",
        "young",
    ),
    (
        5,
        "refunds.submit",
        "GatewayTransient",
        "TRANSIENT",
        "stripe: HTTP 503",
        "done_refund",
        "young",
    ),
]
EXPECTED = {"replayed": 25, "manual_review": 60, "discarded": 10, "unnecessary": 5}

LETTERS_SQL = """
INSERT INTO dead_letters (task_name, task_id, payload, error_type, error_message, attempts,
                          classification, status, created_at, updated_at)
SELECT task, 'bench', CAST(payload AS jsonb), etype, msg, 9, cls, :status, at, at
FROM unnest(CAST(:tasks AS text[]), CAST(:payloads AS text[]), CAST(:etypes AS text[]),
            CAST(:msgs AS text[]), CAST(:classes AS text[]), CAST(:ats AS timestamptz[]))
     AS t(task, payload, etype, msg, cls, at)
"""


def build(n: int, now: datetime) -> tuple[dict[str, list[Any]], int, int]:
    """The letters' columns, and how many active holds and refunds their payloads point at."""
    columns: dict[str, list[Any]] = {
        k: [] for k in ("tasks", "payloads", "etypes", "msgs", "classes", "ats")
    }
    holds = refunds = 0
    for share, task, etype, cls, msg, kind, age in MIX:
        for _ in range(n * share // 100):
            if kind == "active_hold":
                holds += 1
                payload = {"hold_id": holds}
            elif kind in ("refund", "done_refund"):
                refunds += 1
                payload = {"refund_id": refunds}
            elif kind == "no_hold":
                payload = {"hold_id": 10**12}
            else:
                payload = {"hold_id": "12"}
            columns["tasks"].append(task)
            columns["payloads"].append(json.dumps(payload))
            columns["etypes"].append(etype)
            columns["msgs"].append(msg)
            columns["classes"].append(cls)
            columns["ats"].append(now - (timedelta(days=2) if age == "old" else timedelta(hours=1)))
    return columns, holds, refunds


def load(engine: Engine, broker: redis.Redis, n: int, now: datetime, status: str = "NEW") -> None:
    columns, holds, refunds = build(n, now)
    done_from = refunds - n * 5 // 100  # the last 5% of refunds are COMPLETED already
    with engine.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE dead_letter_events, dead_letters, state_transitions, refunds, payments, "
                "booking_holds RESTART IDENTITY CASCADE"
            )
        )
        conn.execute(
            text(
                "INSERT INTO booking_holds (resource_id, user_id, start_time, end_time, "
                "expires_at) SELECT 'r' || g, 'u' || g, now() + interval '1 day', "
                "now() + interval '2 days', now() + interval '1 hour' "
                "FROM generate_series(1, :n) g"
            ),
            {"n": holds},
        )
        conn.execute(
            text(
                "INSERT INTO payments (gateway, gateway_payment_id, amount, currency, status) "
                "SELECT 'stripe', 'pi_' || g, 1000, 'USD', 'COMPLETED' "
                "FROM generate_series(1, :n) g"
            ),
            {"n": refunds},
        )
        conn.execute(
            text(
                "INSERT INTO refunds (payment_id, amount, currency, status) "
                "SELECT g, 100, 'USD', CASE WHEN g > :done THEN 'COMPLETED' ELSE 'FAILED' END "
                "FROM generate_series(1, :n) g"
            ),
            {"n": refunds, "done": done_from},
        )
        conn.execute(text(LETTERS_SQL), {**columns, "status": status})
    settle(engine, "dead_letters, booking_holds, refunds")
    broker.flushdb()


def queued(broker: redis.Redis) -> int:
    return sum(broker.llen(queue) for queue in QUEUES)


def decided(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT status, coalesce(rule, '-'), count(*) FROM dead_letters GROUP BY 1, 2")
        ).all()
    return {f"{status}/{rule}": count for status, rule, count in rows}


def policy() -> Any:
    from tasks.dlq import triage_policy

    return triage_policy()


def run_ours(
    engine: Engine, broker: redis.Redis, n: int, now: datetime, logs: Path
) -> dict[str, Any]:
    """Triage in this process, as the `dlq.triage` task runs it; a real worker (the Procfile's
    shape, consuming `default` only, so the replays it sends stay countable in `critical`)
    sends the replays from the `dlq.dispatch` tasks triage queued."""
    from workers.db import Steps, new_session
    from workers.dlq.triage import triage

    load(engine, broker, n, now)
    worker = processes.worker(
        "bench-dlq",
        {**os.environ, "PYTHONUNBUFFERED": "1"},
        logs / "worker.log",
        "--prefetch-multiplier=1",
        "-O",
        "fair",
        queues="default",
        concurrency=os.cpu_count() or 2,
    )
    session = new_session()
    try:
        started = time.perf_counter()
        counts = triage(Steps(session), now, policy())
        session.commit()
        seconds = time.perf_counter() - started
        deadline = time.monotonic() + 300
        while broker.llen("critical") < counts.replayed and time.monotonic() < deadline:
            time.sleep(0.05)
        sent_all = time.perf_counter() - started
    finally:
        session.close()
        worker.stop()
    return {
        "letters": n,
        "seconds": round(seconds, 3),
        "letters_per_s": round(n / seconds, 1),
        "replays_sent_s": round(sent_all, 3),
        "counts": counts.as_dict(),
        "messages": queued(broker),
        "replay_messages": broker.llen("critical"),
        "decided": decided(engine),
    }


def run_naive(
    engine: Engine, broker: redis.Redis, n: int, subset: int, now: datetime
) -> dict[str, Any]:
    """One letter at a time, as the seed's DLQ job does: read, match, precheck, update + audit,
    send, commit."""
    from sqlalchemy import select

    from workers.db import new_session, transition
    from workers.dlq.replay import run_prechecks, send_replay
    from workers.dlq.rules import match
    from workers.models import DeadLetter

    load(engine, broker, n, now)
    p = policy()
    session = new_session()
    try:
        started = time.perf_counter()
        ids = list(
            session.scalars(
                select(DeadLetter.id)
                .where(DeadLetter.status == "NEW")
                .order_by(DeadLetter.id)
                .limit(subset)
            )
        )
        session.commit()
        for letter_id in ids:
            letter = session.get(DeadLetter, letter_id)
            rule = match(letter)
            to = {"discard": "DISCARDED", "manual": "MANUAL_REVIEW"}.get(rule.action, "RETRYING")
            if to == "RETRYING" and (
                now - letter.created_at > p.manual_after or letter.replays >= p.replay_budget
            ):
                to = "MANUAL_REVIEW"
            if (
                to == "RETRYING"
                and run_prechecks(session, letter.task_name, [letter.payload], "naive")[0]
            ):
                to = "DISCARDED"
            transition(
                session, "dead_letters", letter_id, to, actor="naive", reason=rule.reason, now=now
            )
            if to == "RETRYING":
                send_replay(session, letter_id, letter.task_name, letter.payload)
            session.commit()
        seconds = time.perf_counter() - started
    finally:
        session.close()
    return {
        "letters": len(ids),
        "seconds": round(seconds, 3),
        "letters_per_s": round(len(ids) / seconds, 1),
    }


def run_bulk_replay(
    engine: Engine, broker: redis.Redis, n: int, subset: int, now: datetime
) -> dict[str, Any]:
    """The operator replays every letter in manual review (`dlq replay --all --status
    MANUAL_REVIEW --yes`): `subset + n` letters of the incident's mix loaded in MANUAL_REVIEW.
    First the per-letter path `dlq replay --all` took before (`workers.dlq.replay.replay`, 500
    letters per transaction, a transition, an event and a send per letter) on the first
    `subset`; then the batched path it takes now (`workers.dlq.bulk`) on the other `n`:
    decisions committed and `dlq.dispatch` tasks queued."""
    from sqlalchemy import select

    from workers.base import utcnow
    from workers.db import Steps, new_session
    from workers.dlq.browse import Filters
    from workers.dlq.bulk import Selection, act_on_selection
    from workers.dlq.replay import replay
    from workers.models import DeadLetter

    load(engine, broker, subset + n, now, status="MANUAL_REVIEW")
    session = new_session()
    try:
        ids = list(
            session.scalars(
                select(DeadLetter.id)
                .where(DeadLetter.status == "MANUAL_REVIEW")
                .order_by(DeadLetter.id)
                .limit(subset)
            )
        )
        session.commit()
        started = time.perf_counter()
        for start in range(0, len(ids), 500):
            replay(session, ids[start : start + 500], actor="ops", reason="bench", now=utcnow())
            session.commit()
        per_letter = time.perf_counter() - started
        events_before = session.scalar(text("SELECT count(*) FROM dead_letter_events"))
        session.commit()
        started = time.perf_counter()
        counts = act_on_selection(
            Steps(session),
            Selection(Filters(statuses=("MANUAL_REVIEW",)), utcnow()),
            "replay",
            actor="ops",
            reason="bench",
            now=utcnow(),
        )
        batched = time.perf_counter() - started
        events = session.scalar(text("SELECT count(*) FROM dead_letter_events")) - events_before
        session.commit()
    finally:
        session.close()
    return {
        "per_letter": {"letters": len(ids), "seconds": round(per_letter, 3)},
        "batched": {
            "letters": counts.taken,
            "seconds": round(batched, 3),
            "counts": counts.as_dict(),
            "events": events,
            "dispatch_tasks": broker.llen("default"),
        },
    }


def report_bulk(bulk: dict[str, Any], many_n: int) -> dict[str, Any]:
    one, many = bulk["per_letter"], bulk["batched"]
    one_rate = one["letters"] / one["seconds"]
    many_rate = many["letters"] / many["seconds"]
    ratio = many_rate / one_rate
    ok = (
        many["seconds"] <= TARGET_SECONDS
        and ratio >= 20
        and many["letters"] == many["events"] == many_n
    )
    print(
        f"\n  `dlq replay --all` over {many_n:,} letters in manual review:\n"
        f"  {'per-letter path (before)':<34}{one['letters']:>9,}{one['seconds']:>9.2f}"
        f"{one_rate:>11,.0f}{1:>8.1f}x\n"
        f"  {'batched: workers.dlq.bulk':<34}{many['letters']:>9,}{many['seconds']:>9.2f}"
        f"{many_rate:>11,.0f}{ratio:>8.1f}x   "
        f"(<= {TARGET_SECONDS:.0f} s and >= 20x: {'PASS' if ok else 'FAIL'})"
    )
    print(
        f"  batched: {many['counts']}, {many['events']:,} events, "
        f"{many['dispatch_tasks']} dlq.dispatch tasks queued"
    )
    return {"ratio": round(ratio, 1), "seconds": many["seconds"], "ok": ok}


def report(n: int, ours: dict[str, Any], naive: dict[str, Any]) -> dict[str, Any]:
    ratio = ours["letters_per_s"] / naive["letters_per_s"]
    expected = {key: n * share // 100 for key, share in EXPECTED.items()}
    counts = ours["counts"]
    exact = all(counts[key] == value for key, value in expected.items())
    messages_ok = ours["replay_messages"] == counts["replayed"] == ours["messages"]
    ok = ours["seconds"] <= TARGET_SECONDS
    whole = n / naive["letters_per_s"]
    print(
        f"\n  {'approach':<34}{'letters':>9}{'seconds':>9}{'letters/s':>11}{'x naive':>9}"
        f"   <= {TARGET_SECONDS:g} s"
    )
    print(
        f"  {'ours: workers.dlq.triage':<34}{n:>9,}{ours['seconds']:>9.2f}"
        f"{ours['letters_per_s']:>11,.0f}{ratio:>8.1f}x   {'PASS' if ok else 'FAIL'}"
    )
    print(
        f"  {'naive: one letter at a time':<34}{naive['letters']:>9,}{naive['seconds']:>9.2f}"
        f"{naive['letters_per_s']:>11,.0f}{1:>8.1f}x   (all {n:,}: ~{whole:,.0f} s)"
    )
    print(
        f"  every replay message in Redis {ours['replays_sent_s']:.2f} s after triage started "
        "(sent by the worker from the `dlq.dispatch` tasks)"
    )
    print(f"\n  decisions: {counts}")
    print(f"  as the rules say ({expected}): {'PASS' if exact else 'FAIL'}")
    print(
        f"  replay messages: {ours['replay_messages']:,} for {counts['replayed']:,} replayed, "
        f"nothing else queued: {'PASS' if messages_ok else 'FAIL'}"
    )
    return {
        "within_target": ok,
        "ratio": round(ratio, 1),
        "exact": exact,
        "messages_ok": messages_ok,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 letters, for a smoke run")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()
    urls = service_urls()
    if urls is None:
        return 2
    url, broker_url = urls
    n = 10_000 if args.quick else 100_000
    subset = 1_000 if args.quick else 5_000
    from workers import celery_app  # noqa: F401  (replays are sent through the app)
    from workers.db import get_engine
    from workers.db.migrate import upgrade

    upgrade(url)
    engine = get_engine()
    broker = redis.Redis.from_url(broker_url)
    print(f"backstop dead-letter triage bench ({'quick' if args.quick else 'full'})")
    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "machine": machine(engine, broker),
    }
    now = datetime.now(UTC)
    mix = ", ".join(f"{share}% {task} {error}" for share, task, error, *_ in MIX)
    print(f"\nOne triage run over {n:,} NEW dead letters (mix: {mix})")
    with tempfile.TemporaryDirectory(prefix="backstop-bench-") as folder:
        ours = run_ours(engine, broker, n, now, Path(folder))
    naive = run_naive(engine, broker, n, subset, now)
    bulk = run_bulk_replay(engine, broker, n, subset, now)
    results.update(ours=ours, naive=naive, bulk=bulk)
    results["summary"] = report(n, ours, naive)
    results["summary"]["bulk_replay"] = report_bulk(bulk, n)
    if args.json:
        print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
