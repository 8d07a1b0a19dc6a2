"""Outage drill: what a day-long provider and gateway outage leaves behind, drained by the
recovery paths with real workers, on a real PostgreSQL and Redis, against the gateway simulator
and the SMS sandbox (both in this process, over HTTP with the real clients).

1. Escalation (in this process, database only): N refunds unresolved for two days escalated in
   one run of the retry job's first step (`escalate_unresolved` + `alert_escalated`, one
   transaction): its database time (every statement's time at the driver, summed) and its
   alerts, beside raw `UPDATE ... RETURNING` over the same rows (the everyday floor) and the
   row-by-row form it replaced (an UPDATE and an alert per refund, on a subset).
2. The outbox sweep after N lost delivery messages: N SMS notifications PENDING, due, their
   delivery messages lost 10 minutes ago; one `notifications.sweep_outbox` sent by name, as
   beat's first tick after the outage sends it: it marks them and kicks a pump per batch, and
   the pumps deliver every due row; timed until every one is SENT. Beside it, same worker,
   alternating rounds: delivery alone (the rows written by SQL, one `notifications.deliver_due`
   sent: the everyday path; the sweep is at best as fast) and the row-by-row form the sweep
   used before (one `notifications.deliver` message per row, on a subset).
3. The drill. The outage's leftovers, written set-based in the states the code leaves them in
   (the failure paths that produce them are tested in tests/): SMS notifications PENDING with
   their messages lost and some DEAD with their dead letters; refunds stuck PROCESSING (the
   gateway has since settled them) and PENDING (the request timed out: half reached the
   gateway, half never did); dead letters of an incident's mix (young transient ones triage
   replays, old ones it leaves for manual review, expiries of holds that do not exist it
   discards). Then the providers come back: the retry job, triage and the outbox sweep are sent
   by name as beat sends them (the sweep again every NOTIFY_OUTBOX_SWEEP_SECONDS while rows
   wait), and once triage has run an operator replays what it left for manual review (`dlq
   replay --all --status MANUAL_REVIEW`, in this process). Timed from "providers back" to
   "nothing left to do": no notification PENDING, no refund not COMPLETED, no letter NEW or
   RETRYING, every queue empty and nothing unacked. Counted: refunds the gateway made twice
   (must be 0), SMS sent twice (counted and printed).

Targets (#15): sweep >= 0.8x delivery alone; escalation of 10,000: one alert, <= 2 s of
database time; the drill drains completely with no duplicate refund.

    .venv/bin/python -m tests.services -- .venv/bin/python bench/outage.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, event, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the shared process helpers live in tests/

from bench.common import machine, scalar, service_urls, settle, verdict  # noqa: E402
from bench.refunds import CURRENCY, SETTLED, seed_simulator  # noqa: E402
from tests import processes  # noqa: E402
from tests.processes import Proc  # noqa: E402

CPUS = os.cpu_count() or 1
QUEUES = ("critical", "default", "notifications", "batch")
SWEEP_EVERY = 10.0  # NOTIFY_OUTBOX_SWEEP_SECONDS for the drill's workers (beat's period)
TARGET_SWEEP_RATIO = 0.8
TARGET_ESCALATION_DB_S = 2.0


@dataclass(frozen=True)
class Sizes:
    escalate: int  # refunds escalated in one run
    escalate_subset: int  # of them, run row by row
    lost: int  # notifications whose delivery messages were lost (the sweep, alone)
    row_by_row: int  # of them, delivered one message per row
    notifications: int  # the drill: notifications left PENDING or DEAD
    dead_notifications: int  # of them, DEAD with a dead letter each
    refunds: int  # the drill: refunds stuck
    letters: int  # the drill: dead letters, besides the DEAD notifications'
    timeout: float


FULL = Sizes(10_000, 1_000, 50_000, 2_000, 50_000, 5_000, 10_000, 15_000, 900.0)
QUICK = Sizes(1_000, 100, 1_000, 200, 1_000, 100, 200, 300, 300.0)


def reset(engine: Engine, broker: redis.Redis) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE notification_attempts, notifications, push_tokens, dead_letter_events, "
                "dead_letters, state_transitions, refunds, payments, booking_holds, job_runs "
                "RESTART IDENTITY CASCADE"
            )
        )
    broker.flushdb()


def wait_until(done: Callable[[], bool], timeout: float, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(every)
    return done()


def idle(broker: redis.Redis) -> bool:
    """No message queued, none unacked (a worker holds nothing)."""
    return not any(broker.llen(queue) for queue in QUEUES) and not broker.hlen("unacked")


@contextmanager
def database_time(engine: Engine) -> Iterator[dict[str, float]]:
    """Every statement's time at the driver (round trip included), summed."""
    spent = {"seconds": 0.0, "statements": 0}
    started: list[float] = []

    def before(*_: Any) -> None:
        started.append(time.perf_counter())

    def after(*_: Any) -> None:
        spent["seconds"] += time.perf_counter() - started.pop()
        spent["statements"] += 1

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    try:
        yield spent
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)


# -- 1. escalation ------------------------------------------------------------------------------

STUCK_REFUNDS_SQL = """
INSERT INTO payments (gateway, gateway_payment_id, amount, currency, status)
SELECT 'stripe', 'pi_esc' || g, 10000, 'USD', 'COMPLETED' FROM generate_series(1, :n) g;
INSERT INTO refunds (payment_id, amount, currency, status, idempotency_key, attempts,
                     last_error, created_at, updated_at)
SELECT g, 2500, 'USD', (ARRAY['PROCESSING', 'FAILED', 'PENDING'])[1 + g % 3], 'esc-' || g, 1,
       'stripe: HTTP 503', now() - interval '2 days', now() - interval '2 days'
FROM generate_series(1, :n) g;
"""
UNFLAG_SQL = "UPDATE refunds SET requires_manual_review = false"
RAW_SQL = """
UPDATE refunds SET requires_manual_review = true, updated_at = now()
WHERE status <> 'COMPLETED' AND NOT requires_manual_review
  AND coalesce(reviewed_at, created_at) <= now() - interval '1 day'
RETURNING id, status, created_at, last_error
"""


def run_escalation(engine: Engine, broker: redis.Redis, sizes: Sizes) -> dict[str, Any]:
    from sqlalchemy import update

    from tasks.refunds import retry_policy
    from workers.db import new_session
    from workers.models import Refund
    from workers.observability.alerts import raise_alert
    from workers.refunds.retries import alert_escalated, escalate_unresolved

    reset(engine, broker)
    with engine.begin() as conn:
        for statement in STUCK_REFUNDS_SQL.strip().split(";\n"):
            conn.execute(text(statement), {"n": sizes.escalate})
    settle(engine)
    policy = retry_policy()
    now = datetime.now(UTC)

    session = new_session()
    try:
        with database_time(engine) as spent:
            started = time.perf_counter()
            escalated = escalate_unresolved(session, now, policy)
            alert_escalated(session, escalated, now)
            session.commit()
            ours_s = time.perf_counter() - started
        alerts = scalar(engine, "SELECT count(*) FROM notifications WHERE recipient = 'ops'")

        with engine.begin() as conn:
            conn.execute(text(UNFLAG_SQL))
        with engine.begin() as conn:
            started = time.perf_counter()
            raw_rows = len(conn.execute(text(RAW_SQL)).all())
            raw_s = time.perf_counter() - started

        with engine.begin() as conn:
            conn.execute(text(UNFLAG_SQL))
            conn.execute(text("DELETE FROM notifications"))
        ids = [refund.id for refund in escalated[: sizes.escalate_subset]]
        logging.disable(logging.ERROR)  # an alert logs an error line; a thousand would
        started = time.perf_counter()
        for refund_id in ids:  # what it replaced: an UPDATE and an alert per refund
            status = session.execute(
                update(Refund)
                .where(Refund.id == refund_id, Refund.requires_manual_review.is_(False))
                .values(requires_manual_review=True, updated_at=now)
                .returning(Refund.status)
            ).scalar_one()
            raise_alert(
                session,
                "refund_manual_review",
                f"refund {refund_id} ({status}) needs manual review",
                dedupe=f"refund-manual-review:{refund_id}",
                now=now,
                refund_id=refund_id,
            )
        session.commit()
        row_s = time.perf_counter() - started
    finally:
        logging.disable(logging.NOTSET)
        session.close()
    broker.flushdb()
    return {
        "refunds": sizes.escalate,
        "escalated": len(escalated),
        "alerts": alerts,
        "seconds": round(ours_s, 3),
        "db_seconds": round(spent["seconds"], 3),
        "statements": spent["statements"],
        "raw": {"rows": raw_rows, "seconds": round(raw_s, 3)},
        "row_by_row": {"refunds": len(ids), "seconds": round(row_s, 3)},
    }


# -- 2. the outbox sweep ------------------------------------------------------------------------

SMS_SQL = """
INSERT INTO notifications (channel, recipient, template, data, status, attempts, last_error,
                           next_attempt_at, enqueued_at, created_at, updated_at)
SELECT 'sms', '+1' || (5550000000 + g)::text, 'message',
       jsonb_build_object('subject', 'Booking ' || g, 'body', 'Your court is booked.'),
       :status, :attempts, :error, now() - interval '1 minute', :enqueued_at,
       now() - interval '1 hour', now() - interval '10 minutes'
FROM generate_series(:first, :last) g
"""


def write_sms(engine: Engine, first: int, n: int, *, lost: bool, status: str = "PENDING") -> None:
    """n SMS rows, recipients numbered from `first`; `lost`: their delivery messages were sent
    10 minutes ago (and lost), else none was ever sent (written by SQL)."""
    with engine.begin() as conn:
        conn.execute(
            text(SMS_SQL),
            {
                "first": first,
                "last": first + n - 1,
                "status": status,
                "attempts": 3 if lost else 0,
                "error": "sms: HTTP 503" if lost else None,
                "enqueued_at": datetime.now(UTC) - timedelta(minutes=10) if lost else None,
            },
        )


def sent(engine: Engine) -> int:
    return int(scalar(engine, "SELECT count(*) FROM notifications WHERE status = 'SENT'"))


def timed_delivery(engine: Engine, n: int, start: Callable[[], None], timeout: float) -> float:
    started = time.perf_counter()
    start()
    wait_until(lambda: sent(engine) >= n, timeout, every=0.05)
    return time.perf_counter() - started


def run_sweep(engine: Engine, broker: redis.Redis, sandbox: Any, sizes: Sizes) -> dict[str, Any]:
    from workers.messaging.enqueue import send

    def phase(label: str, n: int, lost: bool, start: Callable[[], None]) -> dict[str, Any]:
        reset(engine, broker)
        write_sms(engine, 1, n, lost=lost)
        settle(engine)
        sandbox.state.reset()
        seconds = timed_delivery(engine, n, start, sizes.timeout)
        done = sent(engine)
        wait_until(lambda: idle(broker), 60)
        print(f"    {label}: {done:,} SENT in {seconds:.1f} s", flush=True)
        return {
            "notifications": n,
            "sent": done,
            "seconds": round(seconds, 3),
            "per_s": round(done / seconds, 1),
            "sms": sandbox.state.stats()["requests"].get("sms", 0),
        }

    def one_per_row() -> None:
        from workers.celery_app import app

        with app.producer_or_acquire() as producer:
            for notification_id in range(1, sizes.row_by_row + 1):
                app.send_task(
                    "notifications.deliver",
                    kwargs={"notification_id": notification_id},
                    producer=producer,
                )

    rounds: dict[str, list[dict[str, Any]]] = {"delivery": [], "sweep": []}
    pump = ("delivery", "delivery alone (written rows, one pump)", False, "deliver_due")
    swept = ("sweep", "outbox sweep after lost messages", True, "sweep_outbox")
    for order in ((pump, swept), (swept, pump)):  # alternating rounds: neither always first
        for key, label, lost, task in order:
            rounds[key].append(
                phase(label, sizes.lost, lost, lambda t=task: send(f"notifications.{t}", {}))
            )
    return {
        **{key: median_of(runs) for key, runs in rounds.items()},
        "rounds": rounds,
        "row_by_row": phase(
            "one notifications.deliver per row", sizes.row_by_row, True, one_per_row
        ),
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds' median rate, with the counts of the slowest round (every round must be
    whole for its figure to count)."""
    return {
        **min(runs, key=lambda run: run["per_s"]),
        "per_s": round(statistics.median(run["per_s"] for run in runs), 1),
        "seconds": round(statistics.median(run["seconds"] for run in runs), 3),
    }


# -- 3. the drill -------------------------------------------------------------------------------

LETTERS_SQL = """
INSERT INTO dead_letters (task_name, task_id, payload, error_type, error_message, attempts,
                          classification, status, created_at, updated_at)
SELECT :task, 'drill', jsonb_build_object(:key, g), :etype, :msg, 9, :cls, 'NEW', :at, :at
FROM generate_series(:first, :last) g
"""
HOLDS_SQL = """
INSERT INTO booking_holds (resource_id, user_id, start_time, end_time, expires_at)
SELECT 'court-' || g, 'u' || g, now() + interval '1 day', now() + interval '2 days',
       now() - interval '1 hour'
FROM generate_series(1, :n) g;
INSERT INTO push_tokens (token, user_id) SELECT 'tok-' || g, 'u' || g FROM generate_series(1, :n) g
"""
DRILL_REFUNDS_SQL = """
INSERT INTO payments (id, gateway, gateway_payment_id, amount, currency, status,
                      created_at, updated_at)
SELECT n, gw, pid, 10000, upper(cur), 'COMPLETED', now() - interval '3 hours',
       now() - interval '3 hours'
FROM unnest(CAST(:gateways AS text[]), CAST(:payment_ids AS text[]), CAST(:currencies AS text[]))
     WITH ORDINALITY AS t(gw, pid, cur, n);
INSERT INTO refunds (id, payment_id, amount, currency, reason, status, idempotency_key,
                     gateway_refund_id, attempts, key_sent_at, created_at, updated_at)
SELECT n, n, 2500, upper(cur), 'booking cancelled', st, key, nullif(rid, ''), 1,
       now() - interval '2 hours', now() - interval '2 hours', now() - interval '2 hours'
FROM unnest(CAST(:statuses AS text[]), CAST(:refund_ids AS text[]), CAST(:keys AS text[]),
            CAST(:currencies AS text[]))
     WITH ORDINALITY AS t(st, rid, key, cur, n);
SELECT setval(pg_get_serial_sequence('payments', 'id'), :n);
SELECT setval(pg_get_serial_sequence('refunds', 'id'), :n)
"""


def seed_refunds(engine: Engine, state: Any, n: int) -> None:
    """n refunds: the first half PROCESSING (the gateway made them pending and has settled them
    since), the second half PENDING (the request timed out): of those, every other one reached
    the gateway (a refund with its key exists), the rest never did. New refunds settle at once."""
    backlog = seed_simulator(state, n, tag="drill", reached=lambda i: i < n // 2 or i % 2 == 0)
    for gw in CURRENCY:
        state.set_refund_outcome(gw, SETTLED[gw])
    statuses = ["PROCESSING" if i < n // 2 else "PENDING" for i in range(n)]
    # A PENDING refund's gateway id is what its lost answer would have said: not known here.
    refund_ids = [rid if i < n // 2 else "" for i, rid in enumerate(backlog.refund_ids)]
    gateways, payment_ids, keys = backlog.gateways, backlog.payment_ids, backlog.keys
    with engine.begin() as conn:
        for statement in DRILL_REFUNDS_SQL.strip().split(";\n"):
            conn.execute(
                text(statement),
                {
                    "gateways": gateways,
                    "payment_ids": payment_ids,
                    "currencies": [CURRENCY[gw] for gw in gateways],
                    "statuses": statuses,
                    "refund_ids": refund_ids,
                    "keys": keys,
                    "n": n,
                },
            )


def seed_letters(engine: Engine, sizes: Sizes) -> dict[str, int]:
    """The DEAD notifications' letters, and `sizes.letters` hold expiries: a third young and
    transient (replayed by triage), a third two days old (left for manual review), a third
    for holds that do not exist (discarded by rule)."""
    now = datetime.now(UTC)
    third = sizes.letters // 3
    dead_from = sizes.notifications - sizes.dead_notifications + 1
    rows = [
        # (task, key, first, last, error type, message, classification, at)
        ("notifications.deliver", "notification_id", dead_from, sizes.notifications,
         "ProviderError", "sms: HTTP 503", "TRANSIENT", now - timedelta(hours=1)),
        ("holds.expire", "hold_id", 1, third,
         "TransientError", "database busy", "TRANSIENT", now - timedelta(hours=1)),
        ("holds.expire", "hold_id", third + 1, 2 * third,
         "TransientError", "database busy", "TRANSIENT", now - timedelta(days=2)),
        ("holds.expire", "hold_id", 10**12, 10**12 + third - 1,
         "NotFound", "booking_holds does not exist", "PERMANENT", now - timedelta(hours=1)),
    ]  # fmt: skip
    with engine.begin() as conn:
        for statement in HOLDS_SQL.strip().split(";\n"):  # an expired hold notifies by push
            conn.execute(text(statement), {"n": 2 * third})
        for task, key, first, last, etype, msg, cls, at in rows:
            conn.execute(
                text(LETTERS_SQL),
                {"task": task, "key": key, "first": first, "last": last, "etype": etype,
                 "msg": msg, "cls": cls, "at": at},
            )  # fmt: skip
    return {"letters": sizes.dead_notifications + 3 * third, "holds": 2 * third}


@dataclass
class Left:
    pending: int
    refunds: int
    letters: int
    queued: bool

    def nothing(self) -> bool:
        return not (self.pending or self.refunds or self.letters or self.queued)


def left(engine: Engine, broker: redis.Redis) -> Left:
    with engine.connect() as conn:
        pending, refunds, letters = conn.execute(
            text(
                "SELECT (SELECT count(*) FROM notifications WHERE status = 'PENDING'), "
                "(SELECT count(*) FROM refunds WHERE status <> 'COMPLETED'), "
                "(SELECT count(*) FROM dead_letters WHERE status IN ('NEW', 'RETRYING'))"
            )
        ).one()
    return Left(pending, refunds, letters, not idle(broker))


def new_letters(engine: Engine) -> int:
    return int(scalar(engine, "SELECT count(*) FROM dead_letters WHERE status = 'NEW'"))


def job_finished(engine: Engine, job: str) -> bool:
    return bool(
        scalar(
            engine,
            "SELECT count(*) FROM job_runs WHERE job_name = :job AND finished_at IS NOT NULL",
            job=job,
        )
    )


def run_drill(
    engine: Engine, broker: redis.Redis, server: Any, sandbox: Any, sizes: Sizes
) -> dict[str, Any]:
    from tasks.dlq import triage_policy
    from workers.base import utcnow
    from workers.db import Steps, new_session
    from workers.dlq.browse import Filters
    from workers.dlq.bulk import Selection, act_on_selection
    from workers.dlq.triage import triage
    from workers.messaging.enqueue import send

    reset(engine, broker)
    pending = sizes.notifications - sizes.dead_notifications
    write_sms(engine, 1, pending, lost=True)
    write_sms(engine, pending + 1, sizes.dead_notifications, lost=True, status="DEAD")
    seed_refunds(engine, server.state, sizes.refunds)
    seeded = seed_letters(engine, sizes)
    settle(engine)
    sandbox.state.reset()
    effects_before = server.state.effects()
    print(
        f"    left by the outage: {pending:,} notifications PENDING and "
        f"{sizes.dead_notifications:,} DEAD, {sizes.refunds:,} refunds stuck, "
        f"{seeded['letters']:,} dead letters",
        flush=True,
    )

    def retriage() -> None:
        session = new_session()
        try:
            triage(Steps(session), utcnow(), triage_policy())
            session.commit()
        finally:
            session.close()

    marks: dict[str, float] = {}
    started = time.perf_counter()  # providers back
    for job in ("refunds.retry_stuck", "dlq.triage", "notifications.sweep_outbox"):
        send(job, {})
    last_sweep = time.monotonic()
    operator: dict[str, Any] = {}
    deadline = time.monotonic() + sizes.timeout
    while time.monotonic() < deadline:
        now_left = left(engine, broker)
        elapsed = time.perf_counter() - started
        for key, busy in (
            ("notifications sent", now_left.pending),
            ("refunds completed", now_left.refunds),
            ("letters decided and replayed", now_left.letters),
            ("queues empty", now_left.queued),
        ):
            if busy or key not in marks:  # the last time it still had work, once done
                marks[key] = elapsed
        if "operator" not in operator and job_finished(engine, "dlq.triage"):
            marks["triage"] = elapsed
            session = new_session()
            try:  # `backstop dlq replay --all --status MANUAL_REVIEW --yes`, as the CLI runs it
                began = time.perf_counter()
                counts = act_on_selection(
                    Steps(session),
                    Selection(Filters(statuses=("MANUAL_REVIEW",)), utcnow()),
                    "replay",
                    actor="ops",
                    reason="outage drill: providers are back",
                    now=utcnow(),
                )
                operator = {
                    "operator": True,
                    "counts": counts.as_dict(),
                    "seconds": round(time.perf_counter() - began, 3),
                }
            finally:
                session.close()
            marks["operator replayed"] = time.perf_counter() - started
        if now_left.nothing() and "operator" in operator:
            break
        if time.monotonic() - last_sweep >= SWEEP_EVERY:  # beat's next ticks
            send("notifications.sweep_outbox", {})
            if "operator" in operator and new_letters(engine):
                retriage()  # letters that came since: triage's next slot would take them
            last_sweep = time.monotonic()
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    final = left(engine, broker)
    sms = sandbox.state.messages("sms")
    twice = sum(count - 1 for count in Counter(m["to"] for m in sms).values() if count > 1)
    effects = server.state.effects()
    with engine.connect() as conn:
        letters = dict(
            conn.execute(text("SELECT status, count(*) FROM dead_letters GROUP BY status")).all()
        )
        refunds = dict(
            conn.execute(text("SELECT status, count(*) FROM refunds GROUP BY status")).all()
        )
    return {
        "notifications": sizes.notifications,
        "refunds": sizes.refunds,
        "letters": seeded["letters"],
        "seconds": round(seconds, 3),
        "drained": final.nothing(),
        "left": final.__dict__,
        "marks": {key: round(value, 3) for key, value in marks.items()},
        "operator": operator,
        "sms_sent": len(sms),
        "sms_twice": twice,
        "refunds_created": effects["refunds_created"] - effects_before["refunds_created"],
        "duplicate_refunds": len(effects["duplicates"]),
        "letters_by_status": letters,
        "refunds_by_status": refunds,
    }


# -- report -------------------------------------------------------------------------------------


def report(escalation: dict[str, Any], sweep: dict[str, Any], drill: dict[str, Any]) -> dict:
    esc, raw, row = escalation, escalation["raw"], escalation["row_by_row"]
    esc_rate = esc["escalated"] / esc["seconds"]
    raw_rate = raw["rows"] / raw["seconds"]
    row_rate = row["refunds"] / row["seconds"]
    esc_ok = esc["alerts"] == 1 and esc["db_seconds"] <= TARGET_ESCALATION_DB_S
    print(f"\n  {'path':<46}{'items':>8}{'seconds':>9}{'per s':>10}{'ratio':>8}")

    def line(label: str, items: int, seconds: float, per_s: float, ratio: str) -> None:
        print(f"  {label:<46}{items:>8,}{seconds:>9.2f}{per_s:>10,.0f}{ratio:>8}")

    print("  escalation of refunds unresolved for 2 days:")
    line("  ours: one UPDATE ... RETURNING, one alert", esc["escalated"], esc["seconds"],
         esc_rate, f"{esc_rate / raw_rate:.2f}x")  # fmt: skip
    line("  everyday floor: raw UPDATE ... RETURNING", raw["rows"], raw["seconds"], raw_rate, "1x")
    line("  row by row (before): UPDATE + alert each", row["refunds"], row["seconds"],
         row_rate, f"{row_rate / raw_rate:.2f}x")  # fmt: skip
    print(
        f"    database time {esc['db_seconds']:.3f} s in {esc['statements']} statements, "
        f"{esc['alerts']} alert for {esc['escalated']:,} refunds (<= "
        f"{TARGET_ESCALATION_DB_S:g} s and one alert: {verdict(esc_ok)}); "
        f"ours is {esc_rate / row_rate:.0f}x the row-by-row form"
    )
    delivery, swept, one = sweep["delivery"], sweep["sweep"], sweep["row_by_row"]
    sweep_ratio = swept["per_s"] / delivery["per_s"]
    print("  lost delivery messages -> SENT (SMS over HTTP to the sandbox):")
    line("  ours: outbox sweep, one pump kick a batch", swept["sent"], swept["seconds"],
         swept["per_s"], f"{sweep_ratio:.2f}x")  # fmt: skip
    line("  everyday: delivery alone (one pump)", delivery["sent"], delivery["seconds"],
         delivery["per_s"], "1x")  # fmt: skip
    line("  row by row (before): a message per row", one["sent"], one["seconds"], one["per_s"],
         f"{one['per_s'] / delivery['per_s']:.2f}x")  # fmt: skip
    whole = all(
        run["sent"] == run["sms"] == run["notifications"]
        for runs in sweep["rounds"].values()
        for run in runs
    )
    sweep_ok = sweep_ratio >= TARGET_SWEEP_RATIO and whole
    print(
        f"    sweep / delivery alone {sweep_ratio:.2f} (>= {TARGET_SWEEP_RATIO}: "
        f"{verdict(sweep_ok)}); every round, one SMS per notification: {verdict(whole)}"
    )
    print(
        f"\n  the drill: {drill['notifications']:,} notifications, {drill['refunds']:,} refunds, "
        f"{drill['letters']:,} dead letters"
    )
    ordered = sorted(drill["marks"].items(), key=lambda item: item[1])
    marks = ", ".join(f"{key} {value:.1f} s" for key, value in ordered)
    print(f"    providers back -> nothing left to do: {drill['seconds']:.1f} s ({marks})")
    if drill["operator"]:
        op = drill["operator"]
        print(f"    operator's replay of manual review: {op['counts']} in {op['seconds']:.2f} s")
    print(
        f"    drained: {verdict(drill['drained'])} (left: {drill['left']}); "
        f"letters {drill['letters_by_status']}; refunds {drill['refunds_by_status']}"
    )
    # No crash in the drill: nothing may be sent twice (a crash's in-flight duplicates are
    # bench/faults.py's and tests/tasks/test_broker_crash.py's).
    drill_ok = drill["drained"] and drill["duplicate_refunds"] == 0 and drill["sms_twice"] == 0
    print(
        f"    refunds made at the gateway {drill['refunds_created']:,}, twice "
        f"{drill['duplicate_refunds']} (must be 0: {verdict(drill['duplicate_refunds'] == 0)}); "
        f"SMS sent {drill['sms_sent']:,}, to the same number twice {drill['sms_twice']:,}"
    )
    print(f"    the drill (drained, nothing sent or refunded twice): {verdict(drill_ok)}")
    return {
        "escalation_ok": esc_ok,
        "escalation_vs_row_by_row": round(esc_rate / row_rate, 1),
        "sweep_ratio": round(sweep_ratio, 2),
        "sweep_ok": sweep_ok,
        "drill_seconds": drill["seconds"],
        "drill_ok": drill_ok,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()
    urls = service_urls()
    if urls is None:
        return 2
    url, broker_url = urls
    sizes = QUICK if args.quick else FULL

    from workers.devtools.sandbox import API_KEY, SandboxServer
    from workers.devtools.simulator import SimulatorServer

    with (
        SimulatorServer() as server,
        SandboxServer() as sandbox,
        tempfile.TemporaryDirectory(prefix="backstop-bench-") as folder,
    ):
        env = {
            **os.environ,
            **server.gateway_env(),
            "SMS_PROVIDER_URL": sandbox.url,
            "SMS_PROVIDER_API_KEY": API_KEY,
            "PUSH_PROVIDER_URL": sandbox.url,
            "PUSH_PROVIDER_API_KEY": API_KEY,
            "NOTIFY_OUTBOX_SWEEP_SECONDS": str(int(SWEEP_EVERY)),
            "NOTIFY_OUTBOX_AFTER_SECONDS": "60",
            "PYTHONUNBUFFERED": "1",
        }
        os.environ.update(env)  # this process reads the same settings (cached on first read)
        from workers import celery_app  # noqa: F401  (tasks are sent through the app)
        from workers.db import get_engine
        from workers.db.migrate import upgrade

        upgrade(url)
        engine = get_engine()
        broker = redis.Redis.from_url(broker_url)
        print(f"backstop outage drill ({'quick' if args.quick else 'full'})")
        results: dict[str, Any] = {"mode": "quick" if args.quick else "full"}
        results["machine"] = machine(engine, broker)
        print(f"\n  escalation of {sizes.escalate:,} refunds ...", flush=True)
        results["escalation"] = run_escalation(engine, broker, sizes)
        worker: Proc = processes.worker(
            "bench-outage",
            env,
            Path(folder) / "worker.log",
            "--prefetch-multiplier=1",
            "-O",
            "fair",
            queues="critical,default,notifications",
            concurrency=CPUS,
        )
        try:
            print(f"  {sizes.lost:,} lost delivery messages ...", flush=True)
            results["sweep"] = run_sweep(engine, broker, sandbox, sizes)
            print("  the drill ...", flush=True)
            results["drill"] = run_drill(engine, broker, server, sandbox, sizes)
        finally:
            worker.stop()
        broker.flushdb()
    results["summary"] = report(results["escalation"], results["sweep"], results["drill"])
    if args.quick:
        print("  (quick: sizes shrunk for a smoke run; the targets are set for the full run)")
    if args.json:
        print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
