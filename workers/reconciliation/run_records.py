"""Reconciliation runs: their windows, how the nightly job opens them, and the lease that lets
exactly one worker at a time work on a run.

At most one run per gateway and window is open (PENDING, RUNNING or FAILED): a partial unique
index says so, and opening a run for a window that has one returns that one. Whoever works on a
run holds its lease, taken by a compare-and-set and renewed by every commit of the run's work;
a commit that finds the lease taken over by someone else (ours ran out) is rolled back.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from workers.db import Steps, transition
from workers.db.upsert import insert_ignore
from workers.errors import NotFound, TransientError
from workers.models import OPEN_RUN, ReconciliationRun

GATEWAYS = ("razorpay", "stripe")
SLICE = timedelta(hours=1)  # a window is listed as slices of this length, concurrently
TYPES = ("MISSING_IN_DB", "STATUS_MISMATCH", "AMOUNT_MISMATCH", "MISSING_AT_GATEWAY")


class LeaseLost(TransientError):
    """Another worker took the run over after our lease ran out; it carries on, we stop."""


def day_window(day: date, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The UTC bounds of a calendar day in `zone` (23 or 25 hours on a DST change)."""
    start = datetime.combine(day, time(0), zone).astimezone(UTC)
    end = datetime.combine(day + timedelta(days=1), time(0), zone).astimezone(UTC)
    return start, end


def slices_of(start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
    bounds = []
    at = start
    while at < end:
        bounds.append((at, min(at + SLICE, end)))
        at += SLICE
    return bounds


def configured_gateways(settings: Any) -> list[str]:
    """The gateways this deployment has credentials for."""
    names = []
    if settings.RAZORPAY_KEY_ID and settings.RAZORPAY_KEY_SECRET:
        names.append("razorpay")
    if settings.STRIPE_API_KEY:
        names.append("stripe")
    return names


def open_run(
    session: Session, gateway: str, start: datetime, end: datetime, *, now: datetime, actor: str
) -> int:
    """The open run of this gateway and window, made if there is none. Two callers at once
    get the same run: the partial unique index allows one open run per window."""
    insert_ignore(
        session,
        ReconciliationRun,
        {
            "gateway": gateway,
            "window_start": start,
            "window_end": end,
            "status": "PENDING",
            "actor": actor,
            "started_at": now,
            "updated_at": now,
        },
        conflict=["gateway", "window_start", "window_end"],
        where=text(OPEN_RUN),
    )
    return int(
        session.execute(
            select(ReconciliationRun.id).where(
                ReconciliationRun.gateway == gateway,
                ReconciliationRun.window_start == start,
                ReconciliationRun.window_end == end,
                ReconciliationRun.status.in_(("PENDING", "RUNNING", "FAILED")),
            )
        ).scalar_one()
    )


def plan_nightly(
    session: Session,
    now: datetime,
    *,
    gateways: Sequence[str],
    zone: ZoneInfo,
    catch_up_days: int,
    actor: str = "reconciliation.nightly",
) -> list[int]:
    """The runs the nightly job sends, oldest window first: for every gateway, every day of
    the last `catch_up_days` (yesterday included, today not) without a COMPLETED run. A missed
    night is caught up by the next; a run left open is resumed, not started again."""
    today = now.astimezone(zone).date()
    days = [today - timedelta(days=back) for back in range(catch_up_days, 0, -1)]
    earliest, _ = day_window(days[0], zone)
    done = set(
        session.execute(
            select(
                ReconciliationRun.gateway,
                ReconciliationRun.window_start,
                ReconciliationRun.window_end,
            ).where(
                ReconciliationRun.status == "COMPLETED",
                ReconciliationRun.window_start >= earliest,
            )
        ).all()
    )
    runs = []
    for day in days:
        start, end = day_window(day, zone)
        for gateway in gateways:
            if (gateway, start, end) not in done:
                runs.append(open_run(session, gateway, start, end, now=now, actor=actor))
    return runs


def open_runs(
    session: Session,
    gateways: Sequence[str],
    first: date,
    last: date,
    *,
    zone: ZoneInfo,
    now: datetime,
    actor: str,
) -> list[int]:
    """One open run per gateway and day from `first` to `last` (included), as the nightly job
    would have them: a day already reconciled is reconciled again, in a new run."""
    runs = []
    day = first
    while day <= last:
        start, end = day_window(day, zone)
        for gateway in gateways:
            runs.append(open_run(session, gateway, start, end, now=now, actor=actor))
        day += timedelta(days=1)
    return runs


def new_owner(prefix: str = "worker") -> str:
    """Who holds a run's lease: unique per attempt, readable by an operator."""
    return f"{prefix}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class RunState:
    """A run while it works. `progress` and `counts` are committed with every batch:

    - `phase`: `list` (paging through the gateway), `check` (asking about the database
      payments the listing never showed), `done`;
    - `slices`: per hourly slice, [cursor of its next page or None, listed to the end];
    - `batches`: batches committed so far (they number the run's `reconciliation_seen` rows);
    - `minutes`: the payments compared while listing, by minute of the window;
    - `ranges`: in the check phase, the minutes (as [first, last + 1)) to read again;
    - `after`: in the check phase, the (created_at, id) of the last database payment handled.
    """

    run_id: int
    gateway: str
    window_start: datetime
    window_end: datetime
    progress: dict[str, Any]
    counts: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of(cls, run: ReconciliationRun) -> RunState:
        return cls(
            run_id=run.id,
            gateway=run.gateway,
            window_start=run.window_start,
            window_end=run.window_end,
            progress=dict(run.progress or {}),
            counts=Counter({key: int(value) for key, value in (run.counts or {}).items()}),
        )

    @property
    def phase(self) -> str:
        return str(self.progress.get("phase", "list"))

    def slices(self) -> list[tuple[datetime, datetime]]:
        return slices_of(self.window_start, self.window_end)

    def minutes(self) -> list[int]:
        """The payments compared while listing, by minute of the window they were created in
        (as the database has it): the check phase reads only the minutes whose payments were
        not all compared."""
        length = -(-int((self.window_end - self.window_start).total_seconds()) // 60)
        minutes = self.progress.get("minutes")
        if not minutes or len(minutes) != length:
            minutes = self.progress["minutes"] = [0] * length
        return minutes  # type: ignore[no-any-return]

    def slice_state(self) -> list[list[Any]]:
        state = self.progress.get("slices")
        if not state or len(state) != len(self.slices()):
            state = [[None, False] for _ in self.slices()]
            self.progress["slices"] = state
        return state  # type: ignore[no-any-return]


@dataclass(frozen=True)
class RunResult:
    run_id: int
    outcome: str  # completed, already_completed, busy, lease_lost
    counts: dict[str, int]
    holder: str | None = None  # busy: who holds the lease
    held_until: datetime | None = None  # busy: until when, unless its holder renews it


def claim_run(
    steps: Steps, run_id: int, *, owner: str, now: datetime, lease: timedelta, actor: str
) -> ReconciliationRun | RunResult:
    """Take the run's lease (and move it to RUNNING), or say why not, in one step."""
    with steps.step("claim run") as session:
        claimed = take_lease(session, run_id, owner=owner, now=now, lease=lease, actor=actor)
    if isinstance(claimed, ReconciliationRun):
        steps.session.refresh(claimed)
    return claimed


def take_lease(
    session: Session, run_id: int, *, owner: str, now: datetime, lease: timedelta, actor: str
) -> ReconciliationRun | RunResult:
    run = session.get(ReconciliationRun, run_id, populate_existing=True)
    if run is None:
        raise NotFound(f"reconciliation_runs {run_id} does not exist")
    if run.status == "COMPLETED":
        return RunResult(run_id, "already_completed", dict(run.counts))
    taken = session.execute(
        update(ReconciliationRun)
        .where(
            ReconciliationRun.id == run_id,
            ReconciliationRun.status != "COMPLETED",
            ReconciliationRun.lease_until.is_(None) | (ReconciliationRun.lease_until <= now),
        )
        .values(
            owner=owner,
            lease_until=now + lease,
            attempts=ReconciliationRun.attempts + 1,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    if not taken:
        holder = session.execute(
            select(
                ReconciliationRun.owner, ReconciliationRun.status, ReconciliationRun.lease_until
            ).where(ReconciliationRun.id == run_id)
        ).one()
        if holder.status == "COMPLETED":
            return RunResult(run_id, "already_completed", {})
        return RunResult(run_id, "busy", {}, holder=holder.owner, held_until=holder.lease_until)
    transition(
        session,
        "reconciliation_runs",
        run_id,
        "RUNNING",
        actor=actor,
        reason=f"taken by {owner}",
        now=now,
    )
    return run


RUNS = ReconciliationRun.__table__


def save_progress(
    session: Session, state: RunState, owner: str, now: datetime, lease: timedelta
) -> None:
    """The last statement of every batch: the run's progress and counts, and our lease
    renewed; if the lease is no longer ours, the batch is not ours to commit."""
    saved = session.execute(
        update(RUNS)
        .where(RUNS.c.id == state.run_id, RUNS.c.owner == owner)
        .values(
            progress=state.progress,
            counts=dict(state.counts),
            lease_until=now + lease,
            updated_at=now,
        )
    ).rowcount
    if not saved:
        raise LeaseLost(f"reconciliation run {state.run_id}: another worker holds it now")


def release(session: Session, run_id: int, owner: str, now: datetime, error: str | None) -> None:
    """Give the lease back after a failure a retry may get past; the progress stays."""
    session.execute(
        update(RUNS)
        .where(RUNS.c.id == run_id, RUNS.c.owner == owner)
        .values(owner=None, lease_until=None, error=error, updated_at=now)
    )
