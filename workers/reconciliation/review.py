"""Reconciliation findings as people work through them, for the console and `backstop
reconcile`: the recent runs with how many of their findings still wait for a person, a run's
findings filtered, and a finding acknowledged (someone is on it) or resolved, with a reason,
through the audited transition helper (`state_transitions`, entity
`reconciliation_discrepancies`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from workers.db import InvalidTransition, transition
from workers.errors import NotFound
from workers.models import ReconciliationDiscrepancy as Found
from workers.models import ReconciliationRun as Run
from workers.models import StateTransition

# A finding waits for a person while the run did not fix it and nobody resolved it.
WAITING = (Found.fixed.is_(False)) & (Found.status != "RESOLVED")


def recent_runs(
    session: Session, *, limit: int = 50, before: int | None = None, gateway: str | None = None
) -> list[dict[str, Any]]:
    """The newest runs first (keyset-paged below id `before`), each with its counts, how long
    it took and how many of its findings wait for a person."""
    query = select(Run).order_by(Run.id.desc()).limit(limit)
    if before is not None:
        query = query.where(Run.id < before)
    if gateway:
        query = query.where(Run.gateway == gateway)
    runs = list(session.scalars(query))
    waiting = dict(
        session.execute(
            select(Found.run_id, func.count())
            .where(Found.run_id.in_([run.id for run in runs]), WAITING)
            .group_by(Found.run_id)
        ).all()
    )
    return [
        {
            "id": run.id,
            "gateway": run.gateway,
            "window_start": run.window_start,
            "window_end": run.window_end,
            "status": run.status,
            "actor": run.actor,
            "counts": dict(run.counts or {}),
            "seconds": (run.finished_at - run.started_at).total_seconds()
            if run.finished_at
            else None,
            "waiting": waiting.get(run.id, 0),
            "error": run.error,
        }
        for run in runs
    ]


@dataclass(frozen=True)
class FindingFilters:
    type: str | None = None
    status: str | None = None
    waiting: bool = False  # only what waits for a person


def findings_query(
    run_id: int, chosen: FindingFilters, *, limit: int = 100, after: int = 0
) -> Select[Any]:
    """A run's findings in the order they were found, from above id `after`."""
    query = (
        select(
            Found.id,
            Found.type,
            Found.payment_id,
            Found.gateway_payment_id,
            Found.fixed,
            Found.status,
            Found.details,
            Found.updated_at,
        )
        .where(Found.run_id == run_id, Found.id > after)
        .order_by(Found.id)
        .limit(limit)
    )
    if chosen.type:
        query = query.where(Found.type == chosen.type)
    if chosen.status:
        query = query.where(Found.status == chosen.status)
    if chosen.waiting:
        query = query.where(WAITING)
    return query


def findings(
    session: Session,
    run_id: int,
    chosen: FindingFilters,
    *,
    limit: int = 100,
    after: int = 0,
) -> list[Any]:
    return list(session.execute(findings_query(run_id, chosen, limit=limit, after=after)).all())


def run_of(session: Session, run_id: int) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"no reconciliation run {run_id}")
    return run


def finding_history(session: Session, finding_ids: Sequence[int]) -> dict[int, list[Any]]:
    """Who acknowledged or resolved each finding, when and why."""
    rows = session.scalars(
        select(StateTransition)
        .where(
            StateTransition.entity == "reconciliation_discrepancies",
            StateTransition.entity_id.in_(list(finding_ids)),
        )
        .order_by(StateTransition.id)
    )
    history: dict[int, list[Any]] = {}
    for row in rows:
        history.setdefault(row.entity_id, []).append(row)
    return history


def review(
    session: Session,
    finding_ids: Sequence[int],
    to: str,
    *,
    actor: str,
    reason: str,
    now: datetime,
) -> list[tuple[int, str]]:
    """Acknowledge (`to` ACKNOWLEDGED) or resolve (RESOLVED) findings, each audited with
    `actor` and `reason`. Returns each finding's outcome: moved, already so, not allowed (a
    resolved finding is not acknowledged again) or not found."""
    if not reason.strip():
        raise ValueError(f"{'resolving' if to == 'RESOLVED' else 'acknowledging'} needs a reason")
    outcomes = []
    for finding_id in finding_ids:
        try:
            moved = transition(
                session,
                "reconciliation_discrepancies",
                finding_id,
                to,
                actor=actor,
                reason=reason,
                now=now,
            )
        except NotFound:
            outcomes.append((finding_id, f"finding {finding_id} does not exist"))
        except InvalidTransition as exc:
            outcomes.append((finding_id, f"finding {finding_id} is {exc.current}: not {to}"))
        else:
            said = to if moved.changed else f"already {to}"
            outcomes.append((finding_id, f"finding {finding_id}: {said}"))
    return outcomes
