"""The console's refunds that need a person: the list, one refund's story, and the three
actions, each through `workers/refunds/review.py` (as `backstop refunds` does) with the
operator's name as the actor."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask import abort, flash, g, redirect, render_template, request, url_for

from workers.base import utcnow
from workers.console.views import backstop, bp, operator
from workers.db import Steps, session_scope
from workers.errors import NotFound
from workers.refunds import review

PAGE = 50


@bp.get("/refunds")
def refunds() -> Any:
    after = request.args.get("after", 0, type=int)
    stuck = timedelta(seconds=backstop()["settings"].REFUND_STUCK_AFTER_SECONDS)
    with session_scope() as db:
        query = review.needing_a_person(utcnow(), stuck)
        total = review.count(db, query)
        rows = review.page(db, query, limit=PAGE, after=after)
    more = url_for("console.refunds", after=rows[-1].id) if len(rows) == PAGE else None
    return render_template("refunds.html", rows=rows, total=total, more=more, stuck=stuck)


def refund_view(refund_id: int, status: int = 200, **extra: Any) -> Any:
    with session_scope() as db:
        try:
            found = review.story(db, refund_id)
        except NotFound:
            abort(404)
    return render_template("refund.html", refund=found.refund, history=found.history, **extra), (
        status
    )


@bp.get("/refunds/<int:refund_id>")
def refund(refund_id: int) -> Any:
    return refund_view(refund_id)


def act(refund_id: int, action: Any) -> Any:
    """Run one review action in its own transaction; its line is flashed, its refusal shown."""
    try:
        with session_scope() as db:
            said = action(db)
    except review.RefundActionError as exc:
        return refund_view(refund_id, 422, action_error=str(exc))
    except NotFound:
        abort(404)
    flash(said)
    return redirect(url_for("console.refund", refund_id=refund_id))


@bp.post("/refunds/<int:refund_id>/recheck")
@operator
def recheck_refund(refund_id: int) -> Any:
    """Ask the gateway now; its answer is recorded as the retry job's would be."""
    return act(
        refund_id,
        lambda db: review.recheck(
            Steps(db), refund_id, utcnow, backstop()["gateway_for"], actor=g.user.name
        ),
    )


@bp.post("/refunds/<int:refund_id>/retry")
@operator
def retry_refund(refund_id: int) -> Any:
    reason = (request.form.get("reason") or "").strip()
    return act(
        refund_id,
        lambda db: review.new_attempt(
            db, refund_id, actor=g.user.name, reason=reason, now=utcnow()
        ),
    )


@bp.post("/refunds/<int:refund_id>/resolve")
@operator
def resolve_refund(refund_id: int) -> Any:
    reason = (request.form.get("reason") or "").strip()
    return act(
        refund_id,
        lambda db: review.resolve(db, refund_id, actor=g.user.name, reason=reason, now=utcnow()),
    )
