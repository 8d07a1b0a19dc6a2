"""Reconciliation tasks, on the `batch` queue: the nightly job (`reconciliation.nightly`, on
RECONCILE_CRON in TIMEZONE) sends one `reconciliation.run` per gateway and day not yet
reconciled; each run compares a gateway's listing with the database and resumes where it
stopped."""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session

from config import get_settings
from workers.base import TaskContext, task, utcnow
from workers.db import steps_on_one_connection
from workers.errors import Defer
from workers.gateways.registry import get_gateway
from workers.models import ReconciliationRun
from workers.payloads import RunReconciliation
from workers.reconciliation import (
    RunOptions,
    configured_gateways,
    new_owner,
    plan_nightly,
    reconcile_run,
)


def run_options(owner: str, actor: str = "reconciliation.run") -> RunOptions:
    return RunOptions.from_settings(get_settings(), owner=owner, actor=actor)


@task("reconciliation.nightly")
def nightly(ctx: TaskContext) -> dict[str, Any]:
    """Open a run for every configured gateway and every day of the catch-up window that has
    no completed run, and send them (after commit), oldest first."""
    settings = get_settings()

    def work() -> dict[str, Any]:
        gateways = configured_gateways(settings)
        runs = plan_nightly(
            ctx.session,
            ctx.now,
            gateways=gateways,
            zone=ZoneInfo(settings.TIMEZONE),
            catch_up_days=settings.RECONCILE_CATCHUP_DAYS,
        )
        for run_id in runs:
            ctx.enqueue("reconciliation.run", {"run_id": run_id})
        return {"gateways": len(gateways), "runs": len(runs)}

    # Once per schedule slot: a second beat or a manual run in the same slot does nothing.
    return ctx.in_slot(work)


def run_not_completed(session: Session, payload: dict[str, Any], actor: str) -> str | None:
    status = session.execute(
        select(ReconciliationRun.status).where(ReconciliationRun.id == payload.get("run_id"))
    ).scalar_one_or_none()
    return "the run is already COMPLETED" if status == "COMPLETED" else None


@task("reconciliation.run", payload=RunReconciliation, precheck=run_not_completed)
def run(ctx: TaskContext, payload: RunReconciliation) -> dict[str, Any]:
    # A step per batch, on one connection for the whole run.
    with steps_on_one_connection(ctx.session) as steps:
        result = reconcile_run(
            steps,
            payload.run_id,
            utcnow,
            get_gateway,
            run_options(new_owner(f"task:{ctx.task_id}")),
        )
    if result.outcome == "busy" and result.held_until is not None:
        # Held by another worker, perhaps one that died (its message is this one, delivered
        # again): look again when the lease runs out, not at the next night's run.
        wait = (result.held_until - utcnow()).total_seconds() + 1
        raise Defer(wait, f"reconciliation run {result.run_id} is held by {result.holder}")
    return {"run_id": result.run_id, "outcome": result.outcome, **result.counts}
