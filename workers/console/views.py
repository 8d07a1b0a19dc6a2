"""The console's pages. No logic here: each reads through `workers.dlq.browse` and acts
through `workers.dlq.replay`, as `backstop dlq` does, with the operator's name as the actor."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)

from workers.application import registered_tasks
from workers.base import utcnow
from workers.console.auth import User
from workers.db import session_scope
from workers.dlq import browse
from workers.dlq.bulk import BATCH, Selection, preview
from workers.dlq.replay import OPEN, ReplayError, discard, payload_diff, replay, validate_for
from workers.errors import PayloadError
from workers.messaging.enqueue import send
from workers.models import CLASSIFICATIONS, DEAD_LETTER_STATUSES, DeadLetter
from workers.payloads import BulkDeadLetters, Payload, validate

bp = Blueprint("console", __name__)

PAGE = 50


def backstop() -> dict[str, Any]:
    return current_app.extensions["backstop"]  # type: ignore[no-any-return]


@bp.before_app_request
def who() -> Any:
    """Every page but the login form needs a user: from the trusted proxy, or the session."""
    authority = backstop()["authority"]
    user = authority.from_proxy(request.remote_addr, request.headers)
    if user is None and "user" in session:
        name, role = session["user"]
        known = authority.users.get(name)
        if known is not None and known[0] == role:  # still a user, with the same role
            user = User(name, role)
    g.user = user
    if user is None and request.endpoint not in ("console.login", "static"):
        return redirect(url_for("console.login", next=request.full_path))
    return None


def operator(view: Callable[..., Any]) -> Callable[..., Any]:
    """Only an operator may do this; a viewer gets 403 whatever they send."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not g.user.may_act:
            abort(403)
        return view(*args, **kwargs)

    return wrapped


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    error = None
    if request.method == "POST":
        name = request.form.get("username", "")[:128]
        throttle = backstop()["throttle"]
        keys = (f"addr:{request.remote_addr}", f"name:{name}")
        if throttle.blocked(*keys):
            return render_template(
                "login.html", error="too many failed logins; wait 5 minutes"
            ), 429
        user = backstop()["authority"].check_password(name, request.form.get("password", ""))
        if user is None:
            throttle.failed(*keys)
            error = "wrong name or password"
        else:
            session.clear()
            session["user"] = [user.name, user.role]
            session.permanent = True
            target = request.args.get("next", "")
            return redirect(
                target if target.startswith("/") and not target.startswith("//") else "/"
            )
    return render_template("login.html", error=error), 401 if error else 200


@bp.post("/logout")
def logout() -> Any:
    session.clear()
    return redirect(url_for("console.login"))


def duration(value: str | None) -> timedelta | None:
    """A filter's age, or no condition when it is empty or not a duration."""
    try:
        return browse.parse_duration(value) if value else None
    except ValueError:
        return None


FILTER_FIELDS = ("task", "status", "classification", "error", "rule", "older", "newer")


def filter_args(args: Any) -> dict[str, list[str]]:
    """The filter fields of a query string or form, to carry from page to page."""
    return {key: [v for v in args.getlist(key) if v] for key in FILTER_FIELDS if args.get(key)}


def statuses_from(args: Any) -> tuple[str, ...]:
    """The chosen statuses: none chosen is the open ones (what someone may act on); "any" is
    every status."""
    chosen = args.getlist("status")
    if "any" in chosen:
        return ()
    return tuple(s for s in chosen if s in DEAD_LETTER_STATUSES) or OPEN


def filters_from(args: Any) -> browse.Filters:
    return browse.Filters(
        task=args.get("task") or None,
        statuses=statuses_from(args),
        error=args.get("error") or None,
        classification=args.get("classification") or None,
        rule=args.get("rule") or None,
        older_than=duration(args.get("older")),
        newer_than=duration(args.get("newer")),
    )


@bp.get("/dead-letters")
def letters() -> Any:
    chosen = filters_from(request.args)
    before = request.args.get("before", type=int)
    now = utcnow()
    with session_scope() as db:
        query = chosen.select(now)
        groups = browse.groups(db, query)
        rows = browse.page(db, query, limit=PAGE, before=before)
        shown = [
            {
                "id": row.id,
                "task_name": row.task_name,
                "status": row.status,
                "classification": row.classification,
                "error": f"{row.error_type}: {row.error_message}"[:200],
                "age": browse.age(now - row.created_at),
            }
            for row in rows
        ]
    args = {key: values for key, values in request.args.to_dict(flat=False).items()}
    args.pop("before", None)
    more = None
    if len(shown) == PAGE:
        more = url_for("console.letters", **args, before=shown[-1]["id"])
    return render_template(
        "letters.html",
        groups=[{**group.__dict__, "age": browse.age(now - group.oldest)} for group in groups],
        letters=shown,
        more=more,
        args=request.args,
        carried=filter_args(request.args),
        statuses=DEAD_LETTER_STATUSES,
        classifications=CLASSIFICATIONS,
    )


def shown_payload(task_name: str, payload: Any) -> Any:
    """The payload as an operator may see it: the fields the task's model redacts (a
    webhook's body and signature) by their length only."""
    model: type[Payload] | None = getattr(registered_tasks().get(task_name), "payload_model", None)
    redacted = getattr(model, "REDACTED", frozenset()) if model else frozenset()
    if not isinstance(payload, dict) or not redacted:
        return payload
    return {
        k: f"<redacted, {len(str(v))} chars>" if k in redacted else v for k, v in payload.items()
    }


def letter_view(letter_id: int, **extra: Any) -> Any:
    with session_scope() as db:
        letter = db.get(DeadLetter, letter_id)
        if letter is None:
            abort(404)
        payload = shown_payload(letter.task_name, letter.payload)
        data = {
            "letter": letter,
            "payload": json.dumps(payload, indent=2, sort_keys=True),
            "redacted": payload != letter.payload,
            "history": browse.history(db, letter_id),
            "open": letter.status in ("NEW", "MANUAL_REVIEW"),
        }
        return render_template("letter.html", **data, **extra)


@bp.get("/dead-letters/<int:letter_id>")
def letter(letter_id: int) -> Any:
    return letter_view(letter_id)


@bp.post("/dead-letters/<int:letter_id>/replay")
@operator
def replay_letter(letter_id: int) -> Any:
    """Replay, as it is or edited: the edit is validated against the task's schema and its diff
    shown before anything is sent; the replay itself goes through `workers.dlq.replay`."""
    reason = (request.form.get("reason") or "").strip() or "replayed from the console"
    text = request.form.get("payload")
    with session_scope() as db:
        letter = db.get(DeadLetter, letter_id)
        if letter is None:
            abort(404)
        task_name, before = letter.task_name, dict(letter.payload)
    edit = None
    if text is not None and text.strip():
        try:
            edited = json.loads(text)
            if not isinstance(edited, dict):
                raise ReplayError("the payload must be a JSON object")
            edit = validate_for(task_name, edited)
        except (ValueError, ReplayError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return letter_view(letter_id, edit_error=message, edit_text=text), 422
        if edit == before:
            edit = None
    if request.form.get("confirm") != "yes":
        diff = payload_diff(before, edit) if edit is not None else {}
        return letter_view(letter_id, confirm=True, diff=diff, edit_text=text or "", reason=reason)
    with session_scope() as db:
        try:
            [outcome] = replay(
                db, [letter_id], actor=g.user.name, reason=reason, now=utcnow(), edit=edit
            )
        except ReplayError as exc:
            return letter_view(letter_id, edit_error=str(exc), edit_text=text or ""), 422
    flash(f"dead letter {letter_id}: {outcome.outcome} {outcome.detail}".strip())
    return redirect(url_for("console.letter", letter_id=letter_id))


@bp.post("/dead-letters/<int:letter_id>/discard")
@operator
def discard_letter(letter_id: int) -> Any:
    reason = (request.form.get("reason") or "").strip()
    if not reason:
        return letter_view(letter_id, discard_error="a discard needs a reason"), 422
    with session_scope() as db:
        [outcome] = discard(db, [letter_id], actor=g.user.name, reason=reason, now=utcnow())
    flash(f"dead letter {letter_id}: {outcome.outcome} {outcome.detail}".strip())
    return redirect(url_for("console.letter", letter_id=letter_id))


@bp.post("/dead-letters/bulk")
@operator
def bulk() -> Any:
    """Replay or discard every open letter the current filter selects: first the count (by
    task) and a confirmation that names it; confirmed, one `dlq.bulk` task takes the letters
    the operator was shown (no later one) through the batched path `backstop dlq replay
    --all` takes, with the operator's name on every letter."""
    action = request.form.get("action")
    if action not in ("replay", "discard"):
        abort(400)
    back = url_for("console.letters", **filter_args(request.form))
    reason = (request.form.get("reason") or "").strip()
    if not reason:
        flash(f"a bulk {action} needs a reason: nothing done")
        return redirect(back)
    chosen = filters_from(request.form)
    if request.form.get("confirm") == "yes":
        return confirmed_bulk(action, reason, chosen, back)
    now = utcnow()
    with session_scope() as db:
        seen = preview(db, Selection(chosen, now), action)
    if seen.count == 0:
        flash(f"no open dead letters match: nothing to {action}")
        return redirect(back)
    return render_template(
        "bulk.html",
        action=action,
        reason=reason,
        seen=seen,
        as_of_ms=int(now.timestamp() * 1000),
        carried=filter_args(request.form),
        back=back,
        batch=BATCH,
    )


def confirmed_bulk(action: str, reason: str, chosen: browse.Filters, back: str) -> Any:
    def seconds(value: timedelta | None) -> int | None:
        return None if value is None else int(value.total_seconds())

    count = request.form.get("count", type=int)
    payload = {
        "action": action,
        "actor": g.user.name,
        "reason": reason,
        "as_of_ms": request.form.get("as_of_ms", type=int),
        "up_to_id": request.form.get("up_to", type=int),
        "task": chosen.task,
        "statuses": list(chosen.statuses),
        "error": chosen.error,
        "classification": chosen.classification,
        "rule": chosen.rule,
        "older_than_seconds": seconds(chosen.older_than),
        "newer_than_seconds": seconds(chosen.newer_than),
    }
    try:  # a tampered form is refused here, not by the worker
        validate(BulkDeadLetters, payload)
    except PayloadError as exc:
        flash(f"not queued: {exc}")
        return redirect(back)
    send("dlq.bulk", payload)
    done = "RETRYING, then REPLAYED," if action == "replay" else "DISCARDED"
    flash(
        f"{action} of {count} dead letters queued (as {g.user.name}, reason: {reason}); "
        f"a worker takes them in batches of {BATCH:,} and they show as {done} as it goes"
    )
    return redirect(back)
