"""`backstop dlq`: the operator's tool for the dead-letter queue."""

from __future__ import annotations

import io
import json
import sys
import textwrap
from dataclasses import astuple
from datetime import datetime, timedelta
from typing import Any

import click

from workers.cli.database import needs_database
from workers.cli.options import actor_option
from workers.cli.output import table
from workers.dlq import browse
from workers.models import CLASSIFICATIONS as CLASSES
from workers.models import DEAD_LETTER_STATUSES as STATUSES


def duration(value: str | None) -> timedelta | None:
    if value is None:
        return None
    try:
        return browse.parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def filters(func_: Any) -> Any:
    options = [
        click.option("--task", help="Task name; * and ? match (refunds.*)."),
        click.option("--status", "statuses", multiple=True, type=click.Choice(STATUSES)),
        click.option(
            "--error", help="Exception class name (PayloadError), or text in the message."
        ),
        click.option("--classification", type=click.Choice(CLASSES)),
        click.option("--rule", help="The triage rule that decided the letter (see dlq list)."),
        click.option("--older-than", help="Only letters older than this (30m, 6h, 2d)."),
        click.option("--newer-than", help="Only letters newer than this."),
    ]
    for option in reversed(options):
        func_ = option(func_)
    return func_


def chosen(
    task: str | None,
    statuses: tuple[str, ...],
    error: str | None,
    classification: str | None,
    rule: str | None,
    older_than: str | None,
    newer_than: str | None,
) -> browse.Filters:
    """The filters as given on the command line."""
    return browse.Filters(
        task=task,
        statuses=statuses,
        error=error,
        classification=classification,
        rule=rule,
        older_than=duration(older_than),
        newer_than=duration(newer_than),
    )


def letter_dict(letter: Any, *, full: bool = False) -> dict[str, Any]:
    data = {
        "id": letter.id,
        "task_name": letter.task_name,
        "status": letter.status,
        "classification": letter.classification,
        "error_type": letter.error_type,
        "error_message": letter.error_message,
        "attempts": letter.attempts,
        "replays": letter.replays,
        "rule": letter.rule,
        "created_at": letter.created_at.isoformat(),
        "updated_at": letter.updated_at.isoformat(),
    }
    if full:
        data.update(
            task_id=letter.task_id,
            payload=letter.payload,
            traceback=letter.traceback,
            resolution=letter.resolution,
            last_replayed_at=letter.last_replayed_at and letter.last_replayed_at.isoformat(),
        )
    return data


def joined(*parts: Any) -> str:
    """The given parts of a table's last cell, one space apart; a dict as JSON."""
    return " ".join(
        json.dumps(part) if isinstance(part, dict) else str(part) for part in parts if part
    )


def age(at: datetime, now: datetime) -> str:
    return browse.age(now - at)


@click.group()
def dlq() -> None:
    """Dead letters: list, show, replay, discard."""


@dlq.command("list")
@filters
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@needs_database
def dlq_list(limit: int, as_json: bool, **given: Any) -> None:
    """Dead letters, newest first, with counts grouped by task, error and status."""
    from workers.base import utcnow
    from workers.db import session_scope

    now = utcnow()
    query = chosen(**given).select(now)
    with session_scope() as session:
        groups = [astuple(group) for group in browse.groups(session, query)]
        rows = [letter_dict(letter) for letter in browse.page(session, query, limit=limit)]
    counts = [
        {
            "task_name": task,
            "error_type": error,
            "classification": kind,
            "status": status,
            "count": count,
            "oldest": oldest.isoformat(),
        }
        for task, error, kind, status, count, oldest in groups
    ]
    if as_json:
        click.echo(json.dumps({"counts": counts, "letters": rows}))
        return
    if not counts:
        click.echo("no dead letters match")
        return
    click.echo(
        table(
            ("count", "oldest", "status", "class", "task / error"),
            [
                (count, age(oldest, now), status, kind, f"{task} / {error}")
                for task, error, kind, status, count, oldest in groups
            ],
            right=("count", "oldest"),
        )
    )
    click.echo("")
    click.echo(
        table(
            ("id", "age", "status", "task", "error"),
            [
                (
                    letter["id"],
                    age(datetime.fromisoformat(letter["created_at"]), now),
                    letter["status"],
                    letter["task_name"],
                    f"{letter['error_type']}: {letter['error_message']}"[:90],
                )
                for letter in rows
            ],
            right=("id", "age"),
        )
    )
    total = sum(count["count"] for count in counts)
    if total > len(rows):
        click.echo(f"... {len(rows)} of {total} shown (--limit)")


@dlq.command("show")
@click.argument("letter_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@needs_database
def dlq_show(letter_id: int, as_json: bool) -> None:
    """One dead letter: payload, error, traceback, attempts and its whole history."""
    from workers.db import session_scope
    from workers.models import DeadLetter

    with session_scope() as session:
        letter = session.get(DeadLetter, letter_id)
        if letter is None:
            raise click.ClickException(f"dead letter {letter_id} does not exist")
        data = letter_dict(letter, full=True)
        data["history"] = [
            {**item, "at": item["at"].isoformat()} for item in browse.history(session, letter_id)
        ]
    if as_json:
        click.echo(json.dumps(data))
        return
    for key in (
        "id",
        "task_name",
        "task_id",
        "status",
        "classification",
        "rule",
        "attempts",
        "replays",
        "created_at",
        "updated_at",
        "last_replayed_at",
        "resolution",
    ):
        click.echo(f"{key + ':':<18}{data[key] if data[key] is not None else '-'}")
    click.echo(f"{'error:':<18}{data['error_type']}: {data['error_message']}")
    click.echo("payload:")
    click.echo(json.dumps(data["payload"], indent=2, sort_keys=True))
    click.echo("history:")
    history = [
        (item["at"], item["what"], item["actor"], joined(item["reason"], item.get("detail")))
        for item in data["history"]
    ]
    click.echo(textwrap.indent(table(("at", "what", "actor", "reason"), history), "  "))
    click.echo("traceback:")
    click.echo(data["traceback"] or "-")


@dlq.command("replay")
@click.argument("letter_ids", nargs=-1, type=int)
@click.option("--all", "replay_all", is_flag=True, help="Every open letter the filters select.")
@filters
@click.option("--dry-run", is_flag=True, help="Say what would happen; change and send nothing.")
@click.option("--edit", is_flag=True, help="Edit the payload in $EDITOR first (one letter).")
@click.option("--payload", "new_payload", help="Replay with this JSON payload (one letter).")
@actor_option
@click.option("--reason", default="manual replay", show_default=True)
@click.option("--yes", is_flag=True, help="With --all: do not ask.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcomes as JSON.")
@needs_database
def dlq_replay(
    letter_ids: tuple[int, ...],
    replay_all: bool,
    dry_run: bool,
    edit: bool,
    new_payload: str | None,
    actor: str,
    reason: str,
    yes: bool,
    as_json: bool,
    **given: Any,
) -> None:
    """Replay dead letters by id, or --all that the filters select (NEW and MANUAL_REVIEW
    unless --status narrows it). Each replay first checks that there is still work to do:
    a refund already COMPLETED, a hold already final, is recorded as unnecessary, not run."""
    if bool(letter_ids) == replay_all:
        raise click.UsageError("give dead letter ids, or --all with filters")
    if (edit or new_payload is not None) and len(letter_ids) != 1:
        raise click.UsageError("--edit and --payload replay exactly one dead letter by id")
    if replay_all:
        in_bulk(
            "replay", given, actor=actor, reason=reason, dry_run=dry_run, yes=yes, as_json=as_json
        )
        return
    by_id(
        letter_ids, edit, new_payload, actor=actor, reason=reason, dry_run=dry_run, as_json=as_json
    )


def by_id(
    letter_ids: tuple[int, ...],
    edit: bool,
    new_payload: str | None,
    *,
    actor: str,
    reason: str,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Replay the letters an operator named, each with its own outcome."""
    from workers import celery_app  # noqa: F401  (the after-commit sends need the app)
    from workers.base import utcnow
    from workers.db import new_session
    from workers.dlq.replay import ReplayError, replay

    session = new_session()
    try:
        edited = None
        if edit or new_payload is not None:
            edited = edited_payload(session, letter_ids[0], new_payload)
        try:
            outcomes = replay(
                session, list(letter_ids), actor=actor, reason=reason, now=utcnow(), edit=edited
            )
        except ReplayError as exc:
            raise click.ClickException(str(exc)) from None
        if dry_run:
            session.rollback()
        else:
            session.commit()
    finally:
        session.rollback()
        session.close()
    report(outcomes, dry_run, as_json)
    if any(outcome.outcome == "not_found" for outcome in outcomes):
        sys.exit(1)


def in_bulk(
    action: str,
    given: dict[str, Any],
    *,
    actor: str,
    reason: str,
    dry_run: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Every open letter the filters select, through the batched path the console and the
    `dlq.bulk` task take: counted first, confirmed, then acted on in committed batches of
    5,000 (progress on stderr). A dry run takes the same path and rolls every batch back."""
    from workers import celery_app  # noqa: F401  (the after-commit sends need the app)
    from workers.base import utcnow
    from workers.db import DryRunSteps, Steps, new_session
    from workers.dlq.bulk import Selection, act_on_selection, preview

    now = utcnow()
    session = new_session()
    try:
        selection = Selection(chosen(**given), now)
        seen = preview(session, selection, action)
        session.rollback()
        if seen.count == 0:
            raise click.ClickException(f"no open dead letters match: nothing to {action}")
        selection = Selection(selection.filters, now, up_to=seen.up_to)
        if not (dry_run or yes):
            if not sys.stdin.isatty():
                raise click.ClickException(
                    f"refusing to {action} {seen.count} dead letters without --yes"
                )
            click.confirm(f"{action} {seen.count} dead letters?", abort=True)
        # A progress bar on a terminal; nothing for scripts (--json, or no terminal).
        shown = not as_json and sys.stderr.isatty()
        steps = DryRunSteps(session) if dry_run else Steps(session)
        with click.progressbar(
            length=seen.count,
            label=f"{action} {seen.count:,} dead letters",
            file=sys.stderr if shown else io.StringIO(),
        ) as bar:
            done = [0]

            def progress(counts: Any) -> None:
                bar.update(counts.taken - done[0])
                done[0] = counts.taken

            counts = act_on_selection(
                steps, selection, action, actor=actor, reason=reason, now=now, progress=progress
            )
    finally:
        session.rollback()
        session.close()
    result = {"dry_run": dry_run, "action": action, "matched": seen.count, **counts.as_dict()}
    if as_json:
        click.echo(json.dumps({**result, "by_task": dict(seen.by_task)}))
        return
    if action == "replay":
        done = f"{counts.replayed} replayed, {counts.unnecessary} unnecessary (closed)"
    else:
        done = f"{counts.discarded} discarded"
    if dry_run:
        click.echo(f"dry run: {seen.count} matched; would be {done}; nothing changed or sent")
    else:
        click.echo(f"{seen.count} matched: {done}")


def edited_payload(session: Any, letter_id: int, given: str | None) -> dict[str, Any]:
    from workers.dlq.replay import ReplayError, validate_for
    from workers.models import DeadLetter

    letter = session.get(DeadLetter, letter_id)
    session.rollback()
    if letter is None:
        raise click.ClickException(f"dead letter {letter_id} does not exist")
    if given is None:
        text = click.edit(
            json.dumps(letter.payload, indent=2, sort_keys=True) + "\n", extension=".json"
        )
        if text is None:
            raise click.ClickException("the payload was not changed: nothing replayed")
        given = text
    try:
        payload = json.loads(given)
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"the edited payload is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise click.ClickException("the edited payload must be a JSON object")
    try:
        return validate_for(letter.task_name, payload)
    except ReplayError as exc:
        raise click.ClickException(str(exc)) from None


def report(outcomes: list[Any], dry_run: bool, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "outcomes": [o.as_dict() for o in outcomes]}))
        return
    verbs = {"replayed": "would replay", "discarded": "would discard"} if dry_run else {}
    totals: dict[str, int] = {}
    for outcome in outcomes:
        totals[outcome.outcome] = totals.get(outcome.outcome, 0) + 1
    if len(outcomes) <= 50:
        rows = [
            (
                outcome.dead_letter_id,
                verbs.get(outcome.outcome, outcome.outcome),
                outcome.task_name,
                joined(
                    outcome.detail and f"({outcome.detail})",
                    outcome.diff and f"changed: {json.dumps(outcome.diff)}",
                ),
            )
            for outcome in outcomes
        ]
        click.echo(table(("id", "outcome", "task", "detail"), rows, right=("id",)))
    summary = ", ".join(
        f"{count} {verbs.get(name, name)}" for name, count in sorted(totals.items())
    )
    click.echo(("dry run: " if dry_run else "") + summary)


@dlq.command("discard")
@click.argument("letter_ids", nargs=-1, type=int)
@click.option("--all", "discard_all", is_flag=True, help="Every open letter the filters select.")
@filters
@click.option("--dry-run", is_flag=True, help="Say what would happen; change nothing.")
@click.option("--reason", required=True, help="Why: kept with the letter.")
@actor_option
@click.option("--yes", is_flag=True, help="With --all: do not ask.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcomes as JSON.")
@needs_database
def dlq_discard(
    letter_ids: tuple[int, ...],
    discard_all: bool,
    dry_run: bool,
    reason: str,
    actor: str,
    yes: bool,
    as_json: bool,
    **given: Any,
) -> None:
    """Close open dead letters for good, with a reason: by id, or --all that the filters
    select (NEW, MANUAL_REVIEW and RETRYING unless --status narrows it)."""
    from workers.base import utcnow
    from workers.db import new_session
    from workers.dlq.replay import ReplayError, discard

    if bool(letter_ids) == discard_all:
        raise click.UsageError("give dead letter ids, or --all with filters")
    if discard_all:
        in_bulk(
            "discard", given, actor=actor, reason=reason, dry_run=dry_run, yes=yes, as_json=as_json
        )
        return
    session = new_session()
    try:
        outcomes = discard(session, list(letter_ids), actor=actor, reason=reason, now=utcnow())
        if dry_run:
            session.rollback()
        else:
            session.commit()
    except ReplayError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        session.rollback()
        session.close()
    report(outcomes, dry_run, as_json)
    if any(outcome.outcome == "not_found" for outcome in outcomes):
        sys.exit(1)
