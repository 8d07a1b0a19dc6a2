"""The console's reconciliation: the recent runs, a run's findings filtered, and a finding
acknowledged or resolved with a reason, through `workers/reconciliation/review.py` (as
`backstop reconcile acknowledge|resolve` does) with the operator's name as the actor."""

from __future__ import annotations

from typing import Any

from flask import abort, flash, g, redirect, render_template, request, url_for
from sqlalchemy import select

from workers.base import utcnow
from workers.console.views import bp, operator
from workers.db import session_scope
from workers.errors import NotFound
from workers.models import DISCREPANCY_STATUSES, DISCREPANCY_TYPES, ReconciliationDiscrepancy
from workers.reconciliation import review

RUNS_PAGE = 50
FINDINGS_PAGE = 100


@bp.get("/reconciliation")
def runs() -> Any:
    before = request.args.get("before", type=int)
    gateway = request.args.get("gateway") or None
    with session_scope() as db:
        shown = review.recent_runs(db, limit=RUNS_PAGE, before=before, gateway=gateway)
    more = None
    if len(shown) == RUNS_PAGE:
        more = url_for("console.runs", before=shown[-1]["id"], gateway=gateway or "")
    return render_template("runs.html", runs=shown, more=more, gateway=gateway)


def chosen_findings(args: Any) -> review.FindingFilters:
    kind = args.get("type")
    status = args.get("review")
    return review.FindingFilters(
        type=kind if kind in DISCREPANCY_TYPES else None,
        status=status if status in DISCREPANCY_STATUSES else None,
        waiting=args.get("waiting") == "1",
    )


@bp.get("/reconciliation/<int:run_id>")
def run(run_id: int) -> Any:
    chosen = chosen_findings(request.args)
    after = request.args.get("after", 0, type=int)
    with session_scope() as db:
        try:
            found_run = review.run_of(db, run_id)
        except NotFound:
            abort(404)
        rows = review.findings(db, run_id, chosen, limit=FINDINGS_PAGE, after=after)
        history = review.finding_history(db, [row.id for row in rows])
        db.expunge(found_run)
    args = {k: v for k, v in request.args.items() if k != "after"}
    more = None
    if len(rows) == FINDINGS_PAGE:
        more = url_for("console.run", run_id=run_id, after=rows[-1].id, **args)
    return render_template(
        "run.html",
        run=found_run,
        rows=rows,
        history=history,
        more=more,
        args=request.args,
        types=DISCREPANCY_TYPES,
        statuses=DISCREPANCY_STATUSES,
        back=request.full_path,
    )


@bp.post("/reconciliation/findings/<int:finding_id>/<any(acknowledge, resolve):action>")
@operator
def review_finding(finding_id: int, action: str) -> Any:
    to = "ACKNOWLEDGED" if action == "acknowledge" else "RESOLVED"
    reason = (request.form.get("reason") or "").strip()
    with session_scope() as db:
        run_id = db.scalar(
            select(ReconciliationDiscrepancy.run_id).where(
                ReconciliationDiscrepancy.id == finding_id
            )
        )
        if run_id is None:
            abort(404)
        if not reason:
            flash(f"finding {finding_id}: a reason is needed to {action} it; nothing changed")
        else:
            [(_, said)] = review.review(
                db, [finding_id], to, actor=g.user.name, reason=reason, now=utcnow()
            )
            flash(said)
    back = request.form.get("back") or ""
    if not back.startswith("/") or back.startswith("//"):
        back = url_for("console.run", run_id=run_id)
    return redirect(back)
