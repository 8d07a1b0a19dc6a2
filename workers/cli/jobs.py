"""`backstop jobs`: every scheduled job's last run and next due, and one run now through its
slot claim (as the console's Schedules page does)."""

from __future__ import annotations

import json

import click

from workers.cli.database import needs_database
from workers.cli.options import actor_option
from workers.cli.output import table


@click.group()
def jobs() -> None:
    """Scheduled jobs: list, run."""


@jobs.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@needs_database
def jobs_list(as_json: bool) -> None:
    """Every beat job: schedule, last run and its outcome, next due, missed or not."""
    from config import get_settings
    from workers.base import utcnow
    from workers.db import session_scope
    from workers.ops.schedules import jobs_overview

    with session_scope() as session:
        views = jobs_overview(session, get_settings(), utcnow())
    if as_json:
        click.echo(json.dumps([view.as_dict() for view in views]))
        return

    def at(value: object) -> str:
        return value.isoformat(timespec="seconds") if value is not None else "never"  # type: ignore[attr-defined]

    click.echo(
        table(
            ("job", "schedule", "last finished", "outcome", "by", "next due", "state"),
            [
                (
                    view.task,
                    view.every,
                    at(view.last_finished),
                    view.outcome or "-",
                    view.requested_by or "beat",
                    at(view.next_due),
                    "MISSED" if view.missed else "ok",
                )
                for view in views
            ],
        )
    )


@jobs.command("run")
@click.argument("name")
@actor_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@needs_database
def jobs_run(name: str, actor: str, as_json: bool) -> None:
    """Run the scheduled job NAME (its task name, e.g. refunds.retry_stuck) now, for its
    current slot. If beat already ran that slot, nothing is sent: a run now never repeats a
    slot's work."""
    from config import get_settings
    from workers import celery_app  # noqa: F401  (the after-commit send needs the app)
    from workers.base import utcnow
    from workers.db import session_scope
    from workers.ops.schedules import JobRefused, run_now

    try:
        with session_scope() as session:
            task_id = run_now(session, name, get_settings(), utcnow(), actor)
    except JobRefused as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"job": name, "task_id": task_id, "requested_by": actor}))
    else:
        click.echo(f"{name}: sent as task {task_id} for its current slot, as {actor}")
