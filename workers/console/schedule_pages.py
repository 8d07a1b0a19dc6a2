"""The console's schedules: every beat job's last run, next due and whether it missed its
window, and "run now" through the slot claim (`workers/ops/schedules.py`, as `backstop jobs
run` does), audited with the operator's name on the slot's `job_runs` row."""

from __future__ import annotations

from typing import Any

from flask import flash, g, redirect, render_template, url_for

from workers.base import utcnow
from workers.console.views import backstop, bp, operator
from workers.db import session_scope
from workers.ops.schedules import JobRefused, jobs_overview, run_now


@bp.get("/schedules")
def schedules() -> Any:
    now = utcnow()
    with session_scope() as db:
        views = jobs_overview(db, backstop()["settings"], now)
    return render_template("schedules.html", jobs=views, now=now)


@bp.post("/schedules/<task>/run")
@operator
def run_job(task: str) -> Any:
    try:
        with session_scope() as db:
            task_id = run_now(db, task, backstop()["settings"], utcnow(), g.user.name)
    except JobRefused as exc:
        flash(f"not run: {exc}")
    else:
        flash(f"{task}: sent as task {task_id} for its current slot, as {g.user.name}")
    return redirect(url_for("console.schedules"))
