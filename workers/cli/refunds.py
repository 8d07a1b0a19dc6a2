"""`backstop refunds`: the refunds that need a person, and what an operator may do about one
(the same functions the console calls: `workers/refunds/review.py`)."""

from __future__ import annotations

import json
import sys
import textwrap
from datetime import timedelta
from typing import Any

import click

from workers.cli.database import needs_database
from workers.cli.options import actor_option
from workers.cli.output import table


@click.group()
def refunds() -> None:
    """Refunds that need a person: list, show, recheck, retry, resolve."""


def refund_dict(row: Any) -> dict[str, Any]:
    data = dict(row._mapping)
    for key, value in data.items():
        if hasattr(value, "isoformat"):
            data[key] = value.isoformat()
    return data


@refunds.command("list")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--after", default=0, type=int, help="Only refunds with a higher id (paging).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@needs_database
def refunds_list(limit: int, after: int, as_json: bool) -> None:
    """Refunds in manual review, or PENDING/PROCESSING with no change for
    REFUND_STUCK_AFTER_SECONDS; oldest first. Resolved ones are not listed."""
    from config import get_settings
    from workers.base import utcnow
    from workers.db import session_scope
    from workers.refunds import review

    stuck = timedelta(seconds=get_settings().REFUND_STUCK_AFTER_SECONDS)
    with session_scope() as session:
        query = review.needing_a_person(utcnow(), stuck)
        total = review.count(session, query)
        rows = review.page(session, query, limit=limit, after=after)
    if as_json:
        click.echo(json.dumps({"total": total, "refunds": [refund_dict(r) for r in rows]}))
        return
    if not rows:
        click.echo("no refund needs a person")
        return
    click.echo(
        table(
            ("id", "gateway", "amount", "status", "review", "attempts", "updated", "last error"),
            [
                (
                    str(row.id),
                    row.gateway,
                    f"{row.amount} {row.currency}",
                    row.status,
                    "yes" if row.requires_manual_review else "stuck",
                    str(row.attempts),
                    row.updated_at.isoformat(timespec="seconds"),
                    (row.last_error or "")[:60],
                )
                for row in rows
            ],
            right=("id", "amount", "attempts"),
        )
    )
    click.echo(
        f"{total} need a person"
        + (f"; next page: --after {rows[-1].id}" if total > len(rows) else "")
    )


@refunds.command("show")
@click.argument("refund_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@needs_database
def refunds_show(refund_id: int, as_json: bool) -> None:
    """One refund: its payment and gateway, attempts, keys, gateway refund id, last error and
    its whole history."""
    from workers.db import session_scope
    from workers.errors import NotFound
    from workers.refunds import review

    with session_scope() as session:
        try:
            found = review.story(session, refund_id)
        except NotFound as exc:
            raise click.ClickException(str(exc)) from None
    data = refund_dict(found.refund)
    history = [{**item, "at": item["at"].isoformat()} for item in found.history]
    if as_json:
        click.echo(json.dumps({**data, "history": history}))
        return
    for key, value in data.items():
        click.echo(f"{key:>22}  {value if value is not None else '-'}")
    click.echo("")
    rows = [(item["at"], item["what"], item["actor"], item["reason"] or "") for item in history]
    click.echo(textwrap.indent(table(("at", "what", "actor", "reason"), rows), "  "))


def act(refund_id: int, action: Any, as_json: bool) -> None:
    from workers.db import session_scope
    from workers.errors import NotFound
    from workers.refunds.review import RefundActionError

    try:
        with session_scope() as session:
            said = action(session)
    except (NotFound, RefundActionError) as exc:
        if as_json:
            click.echo(json.dumps({"refund_id": refund_id, "ok": False, "error": str(exc)}))
            sys.exit(1)
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps({"refund_id": refund_id, "ok": True, "said": said}) if as_json else said)


@refunds.command("recheck")
@click.argument("refund_id", type=int)
@actor_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@needs_database
def refunds_recheck(refund_id: int, actor: str, as_json: bool) -> None:
    """Ask the refund's gateway about it now (also in manual review, or still PENDING) and
    record a final answer."""
    from workers.base import utcnow
    from workers.db import Steps
    from workers.gateways.registry import get_gateway
    from workers.refunds.review import recheck

    act(
        refund_id,
        lambda session: recheck(Steps(session), refund_id, utcnow, get_gateway, actor=actor),
        as_json,
    )


@refunds.command("retry")
@click.argument("refund_id", type=int)
@click.option("--reason", required=True, help="Why: kept in the refund's history.")
@actor_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@needs_database
def refunds_retry(refund_id: int, reason: str, actor: str, as_json: bool) -> None:
    """Send a refund again, out of manual review: a FAILED one with a new key, a PENDING one
    with its own key (looked up at the gateway first if it was sent). Refused for a
    PROCESSING one, already at the gateway: recheck that."""
    from workers import celery_app  # noqa: F401  (the after-commit send needs the app)
    from workers.base import utcnow
    from workers.refunds.review import new_attempt

    act(
        refund_id,
        lambda session: new_attempt(session, refund_id, actor=actor, reason=reason, now=utcnow()),
        as_json,
    )


@refunds.command("resolve")
@click.argument("refund_id", type=int)
@click.option("--reason", required=True, help="How it was resolved: kept in its history.")
@actor_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@needs_database
def refunds_resolve(refund_id: int, reason: str, actor: str, as_json: bool) -> None:
    """Mark a refund in manual review resolved: no automatic retry or escalation takes it
    again."""
    from workers.base import utcnow
    from workers.refunds.review import resolve

    act(
        refund_id,
        lambda session: resolve(session, refund_id, actor=actor, reason=reason, now=utcnow()),
        as_json,
    )
