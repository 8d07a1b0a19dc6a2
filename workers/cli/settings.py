"""`backstop config show`: the settings and limits in effect."""

from __future__ import annotations

import json

import click

from workers.cli.output import table


@click.group("config")
def config_group() -> None:
    """The settings and limits in effect."""


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def config_show(as_json: bool) -> None:
    """Every setting with where its value came from (environment, .env or default; secrets
    filtered), and the limits the Celery app really runs with: acks, time limits, the broker's
    visibility timeout, and each task's queue and retry options.

    A running worker answers the same with `celery -A workers inspect backstop_limits`.
    """
    from config import get_settings
    from workers.celery_app import app
    from workers.observability.limits import limits, settings_in_effect

    app.loader.import_default_modules()  # registers every task, as a worker does
    settings = get_settings()
    shown = {"settings": settings_in_effect(settings), **limits(app, settings)}
    if as_json:
        click.echo(json.dumps(shown, default=str))
        return
    rows = [(row["name"], str(row["value"]), row["source"]) for row in shown["settings"]]
    click.echo(table(("setting", "value", "source"), rows))
    click.echo("")
    celery = {
        **shown["celery"],
        "longest_countdown_seconds": shown["longest_countdown_seconds"],
        "longest_retry_countdown_seconds": shown["longest_retry_countdown_seconds"],
    }
    click.echo(table(("celery", "value"), [(k, str(v)) for k, v in celery.items()]))
    click.echo("")
    columns = ("queue", "max_retries", "acks_late", "reject_on_worker_lost")
    task_rows = [
        (
            name,
            *(str(options[c]) for c in columns),
            f"{options['soft_time_limit']}/{options['time_limit']}",
        )
        for name, options in shown["tasks"].items()
    ]
    click.echo(table(("task", *columns, "time limits (s)"), task_rows))
