"""One reconciliation run, from its claim to its report, resumable at every commit.

1. List: the window's hourly slices are paged concurrently with no transaction open; each
   batch of pages that has arrived is compared with the database in one query and committed
   with the slices' cursors, the payments it compared, and the lease renewed.
2. Check: the window's database payments the listing never showed are asked about one by
   one (concurrently): a payment the gateway has is compared as if listed (created across the
   window's edge, or skipped by a page shift), one it does not know is MISSING_AT_GATEWAY.
3. Finish: COMPLETED with its counts, and an alert if anything waits for a person.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, delete, func, literal, select, tuple_
from sqlalchemy.orm import Session

from config import Settings
from workers.db import Steps, is_postgres, transition
from workers.errors import PermanentError, one_line
from workers.gateways.base import (
    Gateway,
    GatewayNotFound,
    GatewayPayment,
    PaymentPage,
)
from workers.gateways.breaker import defer_while_open
from workers.gateways.fanout import fetch_payments
from workers.models import ReconciliationDiscrepancy as Found
from workers.models import ReconciliationRun, ReconciliationSeen, UTCDateTime
from workers.observability.alerts import raise_alert
from workers.reconciliation.compare import (
    MONEY_MOVED,
    PAYMENTS,
    IdSet,
    apply,
    compare,
    compare_batch,
    load_seen,
    minute_of,
)
from workers.reconciliation.listing import Lister
from workers.reconciliation.run_records import (
    RUNS,
    TYPES,
    LeaseLost,
    RunResult,
    RunState,
    claim_run,
    release,
    save_progress,
)

log = logging.getLogger("backstop.reconciliation")

SCAN_ROWS = 5_000  # database payments read at once in the check phase
CHECK_CHUNK = 200  # unlisted database payments asked about at once

GatewayFor = Callable[[str], Gateway]
Progress = Callable[[RunState], None]


@dataclass(frozen=True)
class RunOptions:
    lease: timedelta
    concurrency: int  # gateway requests in flight at once
    batch_pages: int  # listed pages compared in one query and committed together
    owner: str  # who holds the lease (unique per attempt)
    actor: str  # recorded on every transition

    @classmethod
    def from_settings(cls, settings: Settings, *, owner: str, actor: str) -> RunOptions:
        return cls(
            lease=timedelta(seconds=settings.RECONCILE_LEASE_SECONDS),
            concurrency=settings.RECONCILE_CONCURRENCY,
            batch_pages=settings.RECONCILE_BATCH_PAGES,
            owner=owner,
            actor=actor,
        )


@dataclass
class Work:
    """A claimed run at work: what each of its steps reads and writes."""

    steps: Steps
    state: RunState
    gateway: Gateway
    seen: IdSet  # the payments compared so far
    clock: Callable[[], datetime]
    options: RunOptions
    progress: Progress | None

    @property
    def session(self) -> Session:
        return self.steps.session

    def save(self, now: datetime | None = None) -> None:
        """The end of a batch: the run's progress written and its lease renewed, committed
        with what the batch wrote (or none of it, if the lease is no longer ours)."""
        options = self.options
        with self.steps.step("batch") as session:
            save_progress(session, self.state, options.owner, now or self.clock(), options.lease)

    def show(self) -> None:
        if self.progress is not None:
            self.progress(self.state)


def reconcile_run(
    steps: Steps,
    run_id: int,
    clock: Callable[[], datetime],
    gateway_for: GatewayFor,
    options: RunOptions,
    *,
    progress: Progress | None = None,
) -> RunResult:
    """Do, or resume, one run, a step per batch (its owner may hand it steps on one connection:
    `steps_on_one_connection`). A failure a retry may get past is raised after the lease is
    given back (the next attempt resumes where this one stopped); a permanent one after the run
    is marked FAILED."""
    claimed = claim_run(
        steps, run_id, owner=options.owner, now=clock(), lease=options.lease, actor=options.actor
    )
    if isinstance(claimed, RunResult):
        return claimed
    state = RunState.of(claimed)
    try:
        guarded = gateway_for(state.gateway)
        defer_while_open(guarded)
        # The breaker is read, not called through: pybreaker's shared state costs three Redis
        # round trips per call, a third of what a page costs, and a run stops at its first
        # failed request anyway, to be retried with backoff.
        gateway = getattr(guarded, "adapter", guarded)
        with steps.step("load") as session:
            seen = load_seen(session, run_id)
        work = Work(steps, state, gateway, seen, clock, options, progress)
        if state.phase == "list":
            list_and_compare(work)
        if state.phase == "check":
            check_unlisted(work)
        with steps.step("finish") as session:
            finish(session, state, clock(), options)
    except LeaseLost:
        steps.undo()
        log.warning("reconciliation.lease_lost", extra={"run_id": run_id})
        return RunResult(run_id, "lease_lost", dict(state.counts))
    except PermanentError as exc:
        steps.undo()
        with steps.step("fail") as session:
            fail(session, run_id, exc, clock(), options)
        raise
    except BaseException as exc:  # worth retrying, deferred, or the worker is stopping
        steps.undo()
        with steps.step("release") as session:
            release(session, run_id, options.owner, clock(), one_line(exc)[:2000])
        raise
    log.info(
        "reconciliation.completed",
        extra={
            "run_id": state.run_id,
            "gateway": state.gateway,
            **{key: state.counts[key] for key in ("payments", "discrepancies", "fixed", "flagged")},
        },
    )
    if progress is not None:
        progress(state)
    return RunResult(run_id, "completed", dict(state.counts))


def list_and_compare(work: Work) -> None:
    state, options = work.state, work.options
    slices = state.slice_state()
    lister = Lister(work.gateway, state.slices(), slices, options.concurrency, options.batch_pages)
    with contextlib.closing(lister.batches()) as batches:
        for batch in batches:
            compare_pages(work, batch, slices)
            work.show()
    state.progress["phase"] = "check"
    state.progress["after"] = [state.window_start.isoformat(), 0]
    work.save()


def compare_pages(
    work: Work, batch: list[tuple[int, PaymentPage]], slices: list[list[Any]]
) -> None:
    """One batch of pages in one transaction: compared in one query, written, and committed
    with the slices' cursors and the lease renewed."""
    session, state, now = work.session, work.state, work.clock()
    findings = compare_batch(session, state, [page for _, page in batch], work.seen)
    written = apply(session, state, findings, now, work.options.actor)
    for index, page in batch:
        slices[index] = [page.cursor, page.cursor is None]
    written["pages"] += len(batch)
    written["payments"] += written["matched"] + written["MISSING_IN_DB"] + written["other_attempts"]
    state.counts.update(written)
    work.save(now)


def check_unlisted(work: Work) -> None:
    """The window's database payments the listing did not show, asked about at the gateway.
    A payment with no gateway id that claims money moved (AUTHORIZED, COMPLETED) cannot be
    asked about: it is missing at the gateway as it stands. A PENDING or FAILED one without a
    gateway id is an order nobody paid: nothing to reconcile.

    Only the minutes of the window where the database has more such payments than the listing
    compared are read: one grouped count finds them, usually none."""
    session, state = work.session, work.state
    created = PAYMENTS.c.created_at
    in_window = (
        (PAYMENTS.c.gateway == state.gateway)
        & (created >= state.window_start)
        & (created < state.window_end)
    )
    if "ranges" not in state.progress:
        state.progress["ranges"] = unmatched_minutes(session, state, in_window)
        work.save()
    for first, last in state.progress["ranges"]:
        low = state.window_start + timedelta(minutes=first)
        high = min(state.window_start + timedelta(minutes=last), state.window_end)
        scan(work, in_window & (created >= low) & (created < high))


def unmatched_minutes(session: Session, state: RunState, in_window: Any) -> list[list[int]]:
    """The minutes of the window whose askable payments were not all compared while listing,
    merged into ranges [first, last + 1)."""
    askable = PAYMENTS.c.gateway_payment_id.isnot(None) | PAYMENTS.c.status.in_(MONEY_MOVED)
    minute = minute_of(
        PAYMENTS.c.created_at, literal(state.window_start, UTCDateTime()), is_postgres(session)
    )
    counted = session.execute(
        select(minute, func.count()).where(in_window, askable).group_by(minute)
    ).all()
    matched = state.minutes()
    unmatched = sorted(
        int(m) for m, count in counted if not 0 <= m < len(matched) or count != matched[int(m)]
    )
    ranges: list[list[int]] = []
    for m in unmatched:
        if ranges and ranges[-1][1] == m:
            ranges[-1][1] = m + 1
        else:
            ranges.append([m, m + 1])
    return ranges


def scan(work: Work, where: Any) -> None:
    """Read the payments `where` selects, after the check phase's position, and ask about
    those the listing did not compare."""
    state = work.state
    while True:
        after_at, after_id = state.progress["after"]
        with work.steps.step("read") as session:  # nothing stays open during the calls
            rows = (
                session.connection()
                .execute(
                    select(
                        PAYMENTS.c.id,
                        PAYMENTS.c.gateway_payment_id,
                        PAYMENTS.c.status,
                        PAYMENTS.c.amount,
                        PAYMENTS.c.currency,
                        PAYMENTS.c.created_at,
                    )
                    .where(
                        where,
                        tuple_(PAYMENTS.c.created_at, PAYMENTS.c.id)
                        > tuple_(
                            literal(datetime.fromisoformat(after_at), UTCDateTime()),
                            literal(after_id, BigInteger()),
                        ),
                    )
                    .order_by(PAYMENTS.c.created_at, PAYMENTS.c.id)
                    .limit(SCAN_ROWS)
                )
                .all()
            )
        if not rows:
            return
        unlisted = [
            row
            for row in rows
            if row.id not in work.seen and (row.gateway_payment_id or row.status in MONEY_MOVED)
        ]
        for start in range(0, len(unlisted), CHECK_CHUNK):
            check_chunk(work, unlisted[start : start + CHECK_CHUNK])
            work.show()
        last = rows[-1]
        state.progress["after"] = [last.created_at.isoformat(), last.id]
        work.save()


def check_chunk(work: Work, rows: list[Any]) -> None:
    session, state = work.session, work.state
    ids = [row.gateway_payment_id for row in rows]
    answers = fetch_payments(work.gateway, ids, work.options.concurrency)
    for answer in answers.values():
        if isinstance(answer, Exception) and not isinstance(answer, GatewayNotFound):
            raise answer  # this chunk is asked again by the next attempt
    now = work.clock()
    listed = [answer for answer in answers.values() if isinstance(answer, GatewayPayment)]
    findings = compare(session, state, listed, work.seen)
    findings.counts["unlisted"] += len(rows)
    for row in rows:
        if isinstance(answers.get(row.gateway_payment_id or ""), GatewayPayment):
            continue
        findings.add(
            state.run_id,
            "MISSING_AT_GATEWAY",
            payment_id=row.id,
            gateway_payment_id=row.gateway_payment_id,
            db_status=row.status,
            amount=row.amount,
            currency=row.currency,
            created_at=row.created_at.isoformat(),
        )
    state.counts.update(apply(session, state, findings, now, work.options.actor))
    last = rows[-1]
    state.progress["after"] = [last.created_at.isoformat(), last.id]
    work.save(now)


def finish(session: Session, state: RunState, now: datetime, options: RunOptions) -> None:
    for kind in (*TYPES, "fixed", "flagged", "duplicates", "pages", "payments", "matched"):
        state.counts[kind] += 0  # every report names them
    state.counts["discrepancies"] = sum(state.counts[kind] for kind in TYPES)
    state.progress["phase"] = "done"
    save_progress(session, state, options.owner, now, options.lease)
    transition(
        session,
        "reconciliation_runs",
        state.run_id,
        "COMPLETED",
        actor=options.actor,
        reason=f"{state.counts['payments']} payments listed, "
        f"{state.counts['discrepancies']} discrepancies",
        now=now,
        values={"finished_at": now, "owner": None, "lease_until": None, "error": None},
    )
    session.execute(delete(ReconciliationSeen).where(ReconciliationSeen.run_id == state.run_id))
    flagged = state.counts["flagged"]
    if flagged:
        raise_alert(
            session,
            "reconciliation_discrepancies",
            f"{state.gateway} {state.window_start.isoformat()}..{state.window_end.isoformat()}: "
            f"{flagged} discrepancies need review (backstop reconcile --show {state.run_id})",
            dedupe=f"reconciliation:{state.run_id}",
            now=now,
            run_id=state.run_id,
            gateway=state.gateway,
        )


def fail(
    session: Session, run_id: int, error: Exception, now: datetime, options: RunOptions
) -> None:
    """A permanent failure (no credentials, the gateway refuses us): FAILED, with the error
    and an alert. The nightly catch-up, or a replay of the dead letter, resumes it."""
    message = one_line(error)[:2000]
    owned = (
        session.execute(
            RUNS.update()
            .where(RUNS.c.id == run_id, RUNS.c.owner == options.owner)
            .values(owner=None, lease_until=None, error=message, updated_at=now)
        ).rowcount
        > 0
    )
    if not owned:
        return
    transition(
        session,
        "reconciliation_runs",
        run_id,
        "FAILED",
        actor=options.actor,
        reason=message[:500],
        now=now,
    )
    raise_alert(
        session,
        "reconciliation_failed",
        f"reconciliation run {run_id} failed: {message}",
        dedupe=f"reconciliation-failed:{run_id}:{now.date().isoformat()}",
        now=now,
        run_id=run_id,
    )


def run_report(session: Session, run_id: int, *, limit: int | None = 100) -> dict[str, Any] | None:
    """A run, and its first `limit` discrepancies (all of them: `discrepancies(...)`)."""
    run = session.get(ReconciliationRun, run_id)
    if run is None:
        return None
    return {
        "run_id": run.id,
        "gateway": run.gateway,
        "window_start": run.window_start.isoformat(),
        "window_end": run.window_end.isoformat(),
        "status": run.status,
        "actor": run.actor,
        "started_at": run.started_at.isoformat(),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "attempts": run.attempts,
        "error": run.error,
        "counts": dict(run.counts or {}),
        "discrepancies": list(discrepancies(session, run_id, limit=limit)),
    }


def discrepancies(
    session: Session, run_id: int, *, limit: int | None = None
) -> Iterator[dict[str, Any]]:
    """A run's discrepancies in the order they were found, read a thousand at a time: a run
    that found a million (the wrong account configured, say) must not need a million in
    memory to be shown."""
    query = (
        select(
            Found.id,
            Found.type,
            Found.payment_id,
            Found.gateway_payment_id,
            Found.fixed,
            Found.status,
            Found.details,
        )
        .where(Found.run_id == run_id)
        .order_by(Found.id)
        .execution_options(yield_per=1000)
    )
    if limit is not None:
        query = query.limit(limit)
    for row in session.execute(query):
        yield {
            "id": row.id,
            "type": row.type,
            "payment_id": row.payment_id,
            "gateway_payment_id": row.gateway_payment_id,
            "fixed": row.fixed,
            "review": row.status,
            "details": row.details,
        }
