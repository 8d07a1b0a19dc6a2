"""Reconciliation against the simulator, both gateways over real HTTP with the official SDKs,
on a real Postgres: every discrepancy type, the safe fix and the never-backwards rule,
pagination edges, resume after a crash, concurrent runs, the nightly catch-up."""

from __future__ import annotations

import signal
import sys
import threading
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, func, insert, select

from tests.conftest import service_env, wait_until
from tests.processes import Proc
from tests.workers.factories import CAPTURED, CURRENCY
from workers.db import Steps, new_session, session_scope
from workers.errors import PermanentError
from workers.gateways.base import GatewayTransient, RefundRequest
from workers.gateways.razorpay import RazorpayGateway
from workers.gateways.stripe import StripeGateway
from workers.models import (
    Notification,
    Payment,
    ReconciliationDiscrepancy,
    ReconciliationRun,
    ReconciliationSeen,
    StateTransition,
)
from workers.reconciliation import (
    LeaseLost,
    RunOptions,
    RunResult,
    day_window,
    new_owner,
    open_run,
    plan_nightly,
    reconcile_run,
)
from workers.reconciliation.run_records import RunState, claim_run, save_progress

GATEWAYS = ["razorpay", "stripe"]
UTC_ZONE = ZoneInfo("UTC")
DAY = date(2026, 5, 4)
START, END = day_window(DAY, UTC_ZONE)
LEASE = timedelta(seconds=60)
AUTHORIZED = {"razorpay": "authorized", "stripe": "requires_capture"}
FAILED = {"razorpay": "failed", "stripe": "canceled"}
MISSING = {"razorpay": "pay_DoesNotExist01", "stripe": "pi_DoesNotExist01"}


class Clock:
    def __init__(self, at: datetime | None = None) -> None:
        self.at = at or END + timedelta(hours=2)

    def __call__(self) -> datetime:
        return self.at


def ts(at: datetime) -> int:
    return int(at.timestamp())


def options(concurrency: int = 2, owner: str | None = None, batch_pages: int = 50) -> RunOptions:
    return RunOptions(
        lease=LEASE,
        concurrency=concurrency,
        batch_pages=batch_pages,
        owner=owner or new_owner("test"),
        actor="test",
    )


def paid(sim: Any, gateway: str, at: datetime, **row: Any) -> str:
    row.setdefault("amount", 5_000)
    row.setdefault("status", CAPTURED[gateway])
    return str(sim.add_payment(gateway, currency=CURRENCY[gateway], created=ts(at), **row)["id"])


def ours(
    gateway: str,
    gateway_payment_id: str | None,
    at: datetime,
    *,
    amount: int = 5_000,
    status: str = "COMPLETED",
    order_id: str | None = None,
) -> int:
    with session_scope() as session:
        return int(
            session.execute(
                insert(Payment)
                .values(
                    gateway=gateway,
                    gateway_payment_id=gateway_payment_id,
                    gateway_order_id=order_id,
                    amount=amount,
                    currency=CURRENCY[gateway],
                    status=status,
                    created_at=at,
                    updated_at=at,
                )
                .returning(Payment.id)
            ).scalar_one()
        )


def many(sim: Any, gateway: str, times: list[datetime]) -> None:
    """Payments the gateway and the database agree on, in bulk."""
    rows = [{"amount": 5_000, "currency": CURRENCY[gateway], "created": ts(at)} for at in times]
    ids = sim.add_payments(gateway, rows)
    with session_scope() as session:
        session.execute(
            insert(Payment),
            [
                {
                    "gateway": gateway,
                    "gateway_payment_id": gateway_id,
                    "amount": 5_000,
                    "currency": CURRENCY[gateway],
                    "status": "COMPLETED",
                    "created_at": at,
                    "updated_at": at,
                }
                for gateway_id, at in zip(ids, times, strict=True)
            ],
        )


def both(sim: Any, gateway: str, at: datetime, **row: Any) -> tuple[str, int]:
    """A payment the gateway and the database agree on."""
    gateway_id = paid(sim, gateway, at, **row)
    return gateway_id, ours(gateway, gateway_id, at, amount=row.get("amount", 5_000))


def new_run(gateway: str, start: datetime = START, end: datetime = END) -> int:
    with session_scope() as session:
        return open_run(session, gateway, start, end, now=Clock()(), actor="test")


def reconcile(
    run_id: int,
    gateway_for: Any,
    clock: Clock | None = None,
    run_options: RunOptions | None = None,
) -> RunResult:
    session = new_session()
    try:
        return reconcile_run(
            Steps(session), run_id, clock or Clock(), gateway_for, run_options or options()
        )
    finally:
        session.close()


def findings(run_id: int) -> set[tuple[str, int | None, str | None, bool]]:
    with session_scope() as session:
        rows = session.execute(
            select(
                ReconciliationDiscrepancy.type,
                ReconciliationDiscrepancy.payment_id,
                ReconciliationDiscrepancy.gateway_payment_id,
                ReconciliationDiscrepancy.fixed,
            ).where(ReconciliationDiscrepancy.run_id == run_id)
        ).all()
    assert len(rows) == len(set(rows))
    return {tuple(row) for row in rows}  # type: ignore[misc]


def status_of(payment_id: int) -> str:
    with session_scope() as session:
        return str(session.get(Payment, payment_id).status)


def run_row(run_id: int) -> ReconciliationRun:
    with session_scope() as session:
        return session.get(ReconciliationRun, run_id)


def list_requests(sim: Any, gateway: str) -> int:
    endpoint = "razorpay.payment.list" if gateway == "razorpay" else "stripe.payment_intent.list"
    return int(sim.stats()["requests"].get(endpoint, 0))


@pytest.mark.parametrize("name", GATEWAYS)
def test_every_discrepancy_the_safe_fix_and_never_backwards(
    committed: Engine, sim: Any, gateways: dict[str, Any], name: str
) -> None:
    _, agreed_row = both(sim, name, START + timedelta(hours=1))
    captured = paid(sim, name, START + timedelta(hours=2))
    captured_row = ours(name, captured, START + timedelta(hours=2), status="PENDING")
    authorized = paid(sim, name, START + timedelta(hours=3), status=AUTHORIZED[name])
    authorized_row = ours(name, authorized, START + timedelta(hours=3), status="PENDING")
    failed = paid(sim, name, START + timedelta(hours=4), status=FAILED[name])
    failed_row = ours(name, failed, START + timedelta(hours=4), status="COMPLETED")
    short = paid(sim, name, START + timedelta(hours=5), amount=4_000)
    short_row = ours(name, short, START + timedelta(hours=5), status="PENDING")
    stranger = paid(sim, name, START + timedelta(hours=6))
    ghost_row = ours(name, MISSING[name], START + timedelta(hours=7))
    unreferenced_row = ours(name, None, START + timedelta(hours=8), status="COMPLETED")
    ours(name, None, START + timedelta(hours=9), status="PENDING")  # an order nobody paid
    # Created at 23:59:59 here and a second later at the gateway: listed in the next window,
    # found when asked about, not missing.
    late = paid(sim, name, END + timedelta(seconds=1))
    late_row = ours(name, late, END - timedelta(seconds=1))
    both(sim, name, END + timedelta(hours=1))  # the next day's: not this run's business

    run_id = new_run(name)
    result = reconcile(run_id, gateways.__getitem__)

    assert result.outcome == "completed"
    assert findings(run_id) == {
        ("STATUS_MISMATCH", captured_row, captured, True),
        ("STATUS_MISMATCH", authorized_row, authorized, True),
        ("STATUS_MISMATCH", failed_row, failed, False),
        ("AMOUNT_MISMATCH", short_row, short, False),
        ("STATUS_MISMATCH", short_row, short, False),
        ("MISSING_IN_DB", None, stranger, False),
        ("MISSING_AT_GATEWAY", ghost_row, MISSING[name], False),
        ("MISSING_AT_GATEWAY", unreferenced_row, None, False),
    }
    assert status_of(captured_row) == "COMPLETED"
    assert status_of(authorized_row) == "AUTHORIZED"
    assert status_of(failed_row) == "COMPLETED"  # flagged, never moved backwards
    assert status_of(short_row) == "PENDING"  # the amounts differ: nothing moves
    assert status_of(agreed_row) == status_of(late_row) == "COMPLETED"
    counts = result.counts
    assert counts["payments"] == 6 and counts["fixed"] == 2 and counts["flagged"] == 6
    # Three the listing never showed; two asked about (one without a gateway id cannot be).
    assert counts["unlisted"] == 3
    # Only their minutes of the day were read again: 07:00, 08:00 and 23:59.
    assert run_row(run_id).progress["ranges"] == [[420, 421], [480, 481], [1439, 1440]]
    fetch = "razorpay.payment.fetch" if name == "razorpay" else "stripe.payment_intent.fetch"
    assert sim.stats()["requests"][fetch] == 2
    with session_scope() as session:
        audit = session.execute(
            select(StateTransition.entity_id, StateTransition.to_status, StateTransition.actor)
            .where(StateTransition.entity == "payments")
            .order_by(StateTransition.entity_id)
        ).all()
        alerts = session.scalars(
            select(Notification.template).where(Notification.recipient == "ops")
        ).all()
        seen_left = session.scalar(select(func.count()).select_from(ReconciliationSeen))
    assert [tuple(row) for row in audit] == [
        (captured_row, "COMPLETED", "test"),
        (authorized_row, "AUTHORIZED", "test"),
    ]
    assert alerts == ["alert.reconciliation_discrepancies"]
    assert seen_left == 0
    assert run_row(run_id).status == "COMPLETED"


@pytest.mark.parametrize("name", GATEWAYS)
def test_an_empty_window_and_exactly_a_hundred(
    committed: Engine, sim: Any, gateways: dict[str, Any], name: str
) -> None:
    empty = reconcile(new_run(name), gateways.__getitem__)
    assert empty.outcome == "completed"
    assert empty.counts["pages"] == 24 and empty.counts["payments"] == 0
    assert list_requests(sim, name) == 24  # one empty page per hourly slice

    sim.reset()
    many(sim, name, [START + timedelta(seconds=30 * i) for i in range(100)])
    full = reconcile(new_run(name), gateways.__getitem__)  # the window again, a new run
    assert full.counts["matched"] == full.counts["payments"] == 100
    assert full.counts["discrepancies"] == 0
    # Razorpay says nothing about more: a full page of 100 costs one more, empty, request.
    # Stripe's has_more is false on the last page.
    extra = 1 if name == "razorpay" else 0
    assert full.counts["pages"] == list_requests(sim, name) == 24 + extra


@pytest.mark.parametrize("name", GATEWAYS)
def test_a_payment_created_between_pages_shifts_offsets_and_is_compared_once(
    committed: Engine, sim: Any, gateways: dict[str, Any], name: str
) -> None:
    many(sim, name, [START + timedelta(seconds=10 * i) for i in range(250)])
    newest = START + timedelta(minutes=59)
    created: list[int] = []

    def checkout(state: Any) -> None:
        # A customer pays in the first hour while the listing is on its first page: the
        # gateway lists newest first, so every Razorpay offset after it moves by one.
        created.append(ours(name, paid(state, name, newest), newest))

    endpoint = "razorpay.payment.list" if name == "razorpay" else "stripe.payment_intent.list"
    sim.after_request(endpoint, checkout, nth=1)
    run_id = new_run(name)
    result = reconcile(run_id, gateways.__getitem__, run_options=options(concurrency=1))

    assert created
    counts = result.counts
    # Razorpay's second page repeats the last payment of the first; Stripe's cursor does not.
    assert counts["duplicates"] == (1 if name == "razorpay" else 0)
    assert counts["matched"] == 251  # the new one too: not listed, found when asked about
    assert counts["unlisted"] == 1
    assert counts["payments"] == 250
    assert findings(run_id) == set()


def test_an_order_paid_on_the_second_attempt_learns_its_payment(
    committed: Engine, sim: Any, gateways: dict[str, Any]
) -> None:
    at = START + timedelta(hours=10)
    failed = paid(sim, "razorpay", at, status="failed", order_id="order_Booking0042")
    captured = paid(sim, "razorpay", at + timedelta(minutes=2), order_id="order_Booking0042")
    row = ours("razorpay", None, at, status="PENDING", order_id="order_Booking0042")
    run_id = new_run("razorpay")
    result = reconcile(run_id, gateways.__getitem__)
    with session_scope() as session:
        payment = session.get(Payment, row)
        assert (payment.status, payment.gateway_payment_id) == ("COMPLETED", captured)
    assert findings(run_id) == {("STATUS_MISMATCH", row, captured, True)}
    assert result.counts["linked"] == 1 and result.counts["other_attempts"] == 1
    assert failed not in {gateway_id for _, _, gateway_id, _ in findings(run_id)}


def test_a_razorpay_payment_refunded_in_full_was_captured(
    committed: Engine, sim: Any, gateways: dict[str, Any]
) -> None:
    at = START + timedelta(hours=9)
    settled_id, settled = both(sim, "razorpay", at)
    pending_id = paid(sim, "razorpay", at + timedelta(minutes=1))
    pending = ours("razorpay", pending_id, at + timedelta(minutes=1), status="PENDING")
    for n, gateway_id in enumerate((settled_id, pending_id), start=1):
        request = RefundRequest(
            refund_id=n,
            idempotency_key=f"full-{n}-0123456789",
            amount=5_000,
            gateway_payment_id=gateway_id,
            currency="INR",
            reason=None,
        )
        gateways["razorpay"].submit_refund(request)
    answer = gateways["razorpay"].fetch_payment(settled_id)
    assert (answer.raw_status, answer.status) == ("refunded", "COMPLETED")
    run_id = new_run("razorpay")
    reconcile(run_id, gateways.__getitem__)
    assert status_of(settled) == status_of(pending) == "COMPLETED"
    assert findings(run_id) == {("STATUS_MISMATCH", pending, pending_id, True)}


def test_a_failed_request_keeps_the_progress_and_the_retry_resumes(
    committed: Engine, sim: Any, gateways: dict[str, Any]
) -> None:
    many(sim, "razorpay", [START + timedelta(minutes=minute) for minute in range(24 * 60)])
    run_id = new_run("razorpay")
    sim.after_request(
        "razorpay.payment.list",
        lambda state: state.add_fault("razorpay.payment.list", "503", remaining=1),
        nth=10,
    )
    with pytest.raises(GatewayTransient):
        reconcile(run_id, gateways.__getitem__, run_options=options(concurrency=1))
    stopped = run_row(run_id)
    assert stopped.status == "RUNNING" and stopped.owner is None and "503" in stopped.error
    committed_pages = stopped.counts["pages"]
    assert committed_pages == 10
    result = reconcile(run_id, gateways.__getitem__)
    assert result.outcome == "completed"
    assert result.counts["matched"] == result.counts["payments"] == 24 * 60
    assert result.counts["pages"] == 24
    assert list_requests(sim, "razorpay") == 24 + 1  # every page once, and the one refused
    assert run_row(run_id).attempts == 2


def test_a_refusal_fails_the_run_and_a_later_attempt_resumes_it(
    committed: Engine, sim: Any, gateways: dict[str, Any], simulator_server: Any
) -> None:
    both(sim, "stripe", START + timedelta(hours=3))
    run_id = new_run("stripe")
    wrong = StripeGateway("sk_test_wrong", simulator_server.url, timeout=0.5)
    with pytest.raises(PermanentError):
        reconcile(run_id, {"stripe": wrong}.__getitem__)
    failed = run_row(run_id)
    assert failed.status == "FAILED" and "401" in failed.error and failed.owner is None
    result = reconcile(run_id, gateways.__getitem__)
    assert result.outcome == "completed" and result.counts["matched"] == 1
    with session_scope() as session:
        alerts = session.scalars(select(Notification.template)).all()
        path = session.scalars(
            select(StateTransition.to_status)
            .where(StateTransition.entity == "reconciliation_runs")
            .order_by(StateTransition.id)
        ).all()
    assert "alert.reconciliation_failed" in alerts
    assert path == ["RUNNING", "FAILED", "RUNNING", "COMPLETED"]


def test_two_workers_at_once_one_does_the_work(
    committed: Engine, sim: Any, gateways: dict[str, Any]
) -> None:
    for hour in range(24):
        both(sim, "razorpay", START + timedelta(hours=hour, minutes=5))
    sim.add_fault("razorpay.payment.list", "latency", latency_ms=20)
    run_id = new_run("razorpay")
    barrier = threading.Barrier(2)
    results: list[RunResult] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            results.append(reconcile(run_id, gateways.__getitem__))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(result.outcome for result in results) == ["busy", "completed"]
    busy = next(result for result in results if result.outcome == "busy")
    assert busy.holder and busy.holder.startswith("test:")
    assert list_requests(sim, "razorpay") == 24  # the window was listed once
    assert reconcile(run_id, gateways.__getitem__).outcome == "already_completed"


def test_a_worker_whose_lease_ran_out_cannot_commit(committed: Engine) -> None:
    run_id = new_run("razorpay")
    now = Clock()()
    with session_scope() as session:
        first = claim_run(Steps(session), run_id, owner="a", now=now, lease=LEASE, actor="test")
        assert isinstance(first, ReconciliationRun)
        # Within the lease nobody else gets it; after it, the next one does.
        busy = claim_run(
            Steps(session), run_id, owner="b", now=now + LEASE / 2, lease=LEASE, actor="t"
        )
        assert isinstance(busy, RunResult) and busy.holder == "a"
        later = now + LEASE + timedelta(seconds=1)
        second = claim_run(Steps(session), run_id, owner="b", now=later, lease=LEASE, actor="test")
        assert isinstance(second, ReconciliationRun)
        state = RunState.of(second)
        with pytest.raises(LeaseLost):
            save_progress(session, state, "a", later, LEASE)
        session.rollback()
        save_progress(session, state, "b", later, LEASE)


def test_two_nightly_jobs_at_once_open_one_run_per_window(committed: Engine) -> None:
    barrier = threading.Barrier(4)
    planned: list[list[int]] = []

    def nightly() -> None:
        barrier.wait()
        with session_scope() as session:
            planned.append(
                plan_nightly(
                    session,
                    END + timedelta(hours=2),
                    gateways=GATEWAYS,
                    zone=UTC_ZONE,
                    catch_up_days=3,
                )
            )

    threads = [threading.Thread(target=nightly) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(planned) == 4 and all(runs == planned[0] for runs in planned)
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(ReconciliationRun)) == 6


def test_the_next_night_catches_up_every_window_not_yet_reconciled(
    committed: Engine, sim: Any, gateways: dict[str, Any]
) -> None:
    zone = ZoneInfo("Asia/Kolkata")  # 02:00 there is 20:30 UTC the day before
    tonight = datetime(2026, 5, 10, 2, 0, tzinfo=zone)
    days = [date(2026, 5, day) for day in range(3, 10)]  # the seven days before
    plan = {"gateways": ["razorpay"], "zone": zone, "catch_up_days": 7}
    for day in days:
        start, _ = day_window(day, zone)
        both(sim, "razorpay", start + timedelta(hours=12))
    with session_scope() as session:
        week_ago = plan_nightly(session, tonight - timedelta(days=5), **plan)
    # Beat ran five nights ago and has been down since: only that night's run was made.
    assert len(week_ago) == 7
    with session_scope() as session:
        first = session.get(ReconciliationRun, week_ago[-1])
        assert (first.window_start, first.window_end) == day_window(date(2026, 5, 4), zone)
    assert reconcile(week_ago[-1], gateways.__getitem__).outcome == "completed"

    with session_scope() as session:
        runs = plan_nightly(session, tonight, **plan)
    with session_scope() as session:
        windows = [
            session.execute(
                select(ReconciliationRun.window_start).where(ReconciliationRun.id == run)
            ).scalar_one()
            for run in runs
        ]
    expected = [day for day in days if day != date(2026, 5, 4)]
    assert windows == [day_window(day, zone)[0] for day in expected]  # oldest first
    assert week_ago[-2] == runs[0]  # the run left open is resumed, not doubled
    for run in runs:
        assert reconcile(run, gateways.__getitem__).counts["matched"] == 1
    with session_scope() as session:
        assert plan_nightly(session, tonight, **plan) == []
        assert plan_nightly(session, tonight + timedelta(days=1), **plan) != []


def test_a_run_killed_mid_way_resumes_after_its_last_committed_page(
    committed: Engine, sim: Any, gateways: dict[str, Any], simulator_server: Any, tmp_path: Any
) -> None:
    per_hour = 150  # two pages per slice
    many(
        sim,
        "razorpay",
        [START + timedelta(hours=hour) for hour in range(24) for _ in range(per_hour)],
    )
    sim.add_fault("razorpay.payment.list", "latency", latency_ms=40)
    run_id = new_run("razorpay")
    env = service_env(
        RAZORPAY_KEY_ID=sim.razorpay_key_id,
        RAZORPAY_KEY_SECRET=sim.razorpay_key_secret,
        RAZORPAY_BASE_URL=simulator_server.url,
        RECONCILE_CONCURRENCY="1",
        RECONCILE_BATCH_PAGES="4",  # a commit every 4 of the 48 pages
        RECONCILE_LEASE_SECONDS="30",
        TIMEZONE="UTC",
    )
    cli = Proc(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "reconcile",
            "--gateway",
            "razorpay",
            "--from",
            DAY.isoformat(),
        ],
        env,
        tmp_path / "cli.log",
    )
    try:
        wait_until(lambda: run_row(run_id).counts.get("pages", 0) >= 12, timeout=60, every=0.02)
    finally:
        cli.stop(signal.SIGKILL)
    killed = run_row(run_id)
    assert killed.status == "RUNNING" and killed.owner.startswith("cli:")
    before = list_requests(sim, "razorpay")
    done = killed.counts["pages"]
    assert 12 <= done < 48

    # Within the lease the dead worker still holds it; after it, the run resumes.
    assert reconcile(run_id, gateways.__getitem__, Clock(datetime.now(UTC))).outcome == "busy"
    later = Clock(datetime.now(UTC) + timedelta(seconds=31))
    result = reconcile(run_id, gateways.__getitem__, later, options(concurrency=1, batch_pages=4))
    assert result.outcome == "completed"
    assert result.counts["pages"] == 48
    assert result.counts["matched"] == result.counts["payments"] == 24 * per_hour
    assert result.counts["duplicates"] == 0 and findings(run_id) == set()
    # Only the pages after the last commit were asked for again (the dead worker may have
    # fetched one or two it never committed).
    resumed = list_requests(sim, "razorpay") - before
    assert resumed == 48 - done
    assert before - done <= 4  # in flight, queued, or in the batch being written
    assert run_row(run_id).attempts == 2


def test_the_embedded_sqlite_database_reconciles_too(
    sqlite_engine: Engine, sim: Any, gateways: dict[str, Any]
) -> None:
    from sqlalchemy.orm import Session

    captured = paid(sim, "razorpay", START + timedelta(hours=1))
    stranger = paid(sim, "razorpay", START + timedelta(hours=2))

    def empty() -> None:
        with sqlite_engine.begin() as connection:
            for model in (
                ReconciliationSeen,
                ReconciliationDiscrepancy,
                ReconciliationRun,
                StateTransition,
                Notification,
                Payment,
            ):
                connection.execute(model.__table__.delete())

    empty()
    with sqlite_engine.begin() as connection:
        payment = connection.execute(
            insert(Payment)
            .values(
                gateway="razorpay",
                gateway_payment_id=captured,
                amount=5_000,
                currency="INR",
                status="PENDING",
                created_at=START + timedelta(hours=1),
            )
            .returning(Payment.id)
        ).scalar_one()
    try:
        with Session(sqlite_engine) as session:
            run_id = open_run(session, "razorpay", START, END, now=Clock()(), actor="test")
            session.commit()
            result = reconcile_run(Steps(session), run_id, Clock(), gateways.__getitem__, options())
        assert result.outcome == "completed"
        with Session(sqlite_engine) as session:
            rows = session.execute(
                select(ReconciliationDiscrepancy.type, ReconciliationDiscrepancy.gateway_payment_id)
            ).all()
            assert session.get(Payment, payment).status == "COMPLETED"
    finally:
        empty()
    assert Counter(row.type for row in rows) == {"STATUS_MISMATCH": 1, "MISSING_IN_DB": 1}
    assert stranger in {row.gateway_payment_id for row in rows}


def test_adapters_page_a_window_from_a_saved_cursor(
    sim: Any, gateways: dict[str, RazorpayGateway | StripeGateway]
) -> None:
    for name in GATEWAYS:
        at = [START + timedelta(seconds=i) for i in range(130)]
        sim.add_payments(
            name, [{"amount": 100, "currency": CURRENCY[name], "created": ts(t)} for t in at]
        )
        first = gateways[name].payment_page(START, END, None)
        assert len(first.items) == 100 and first.cursor is not None
        rest = gateways[name].payment_page(START, END, first.cursor)
        assert len(rest.items) == 30 and rest.cursor is None
        assert len({p.id for p in first.items + rest.items}) == 130
