"""The `backstop` command line."""

from __future__ import annotations

import json
import sys

import click

from config import SettingsError
from config.settings import load_settings


@click.group()
def main() -> None:
    """backstop: the background-worker system of the bookings-and-payments platform."""
    try:
        load_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def db() -> None:
    """The database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply the Alembic migrations to DATABASE_URL."""
    from workers import migrate

    migrate.upgrade(revision=revision)
    click.echo(f"database upgraded to {revision}", err=True)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8765, show_default=True, type=click.IntRange(1, 65535))
@click.option("--demo", is_flag=True, help="Start with the payments and faults of `make run`.")
def simulator(host: str, port: int, demo: bool) -> None:
    """Run the local Razorpay/Stripe simulator (point RAZORPAY_BASE_URL/STRIPE_API_BASE at it).

    It accepts the credentials in RAZORPAY_KEY_ID/RAZORPAY_KEY_SECRET/STRIPE_API_KEY, or its
    own test ones when those are unset. Never for production traffic.
    """
    from config import get_settings
    from workers.gateways.simulator import serve

    settings = get_settings()
    credentials = {}
    if settings.RAZORPAY_KEY_ID and settings.RAZORPAY_KEY_SECRET:
        credentials["razorpay_key_id"] = settings.RAZORPAY_KEY_ID
        credentials["razorpay_key_secret"] = settings.RAZORPAY_KEY_SECRET.get_secret_value()
    if settings.STRIPE_API_KEY:
        credentials["stripe_api_key"] = settings.STRIPE_API_KEY.get_secret_value()
    if demo:
        from workers.demo import seed_simulator

        serve(host, port, setup=seed_simulator, **credentials)
    else:
        serve(host, port, **credentials)


@main.command("notify-sandbox")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8766, show_default=True, type=click.IntRange(1, 65535))
@click.option("--demo", is_flag=True, help="Start with the faults of `make run`.")
def notify_sandbox(host: str, port: int, demo: bool) -> None:
    """Run the local SMS and push provider (point SMS_PROVIDER_URL/PUSH_PROVIDER_URL at it).

    It accepts the API key `sandbox-key`. Never for production traffic.
    """
    from workers.notify.sandbox import serve

    if demo:
        from workers.demo import seed_sandbox

        serve(host, port, setup=seed_sandbox)
    else:
        serve(host, port)


@main.group("config")
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
    from workers.limits import limits, settings_in_effect

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


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Rows under a header, each column as wide as its widest cell."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    )


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def health(as_json: bool) -> None:
    """Check database, broker, gateways, schedules and dead letters.

    Exits 0 when healthy, 1 when degraded, 2 when unhealthy (usable as a container check).
    """
    from config import get_settings
    from workers import health as checks
    from workers.base import utcnow

    results = checks.run_checks(get_settings(), utcnow())
    status = checks.overall(results)
    if as_json:
        click.echo(json.dumps(checks.as_json(results)))
    else:
        width = max(len(check.name) for check in results)
        for check in results:
            click.echo(f"{check.name:<{width}}  {check.status:<9}  {check.detail}")
        click.echo(f"{'overall':<{width}}  {status}")
    sys.exit(checks.LEVELS[status])


@main.command()
@click.option(
    "--gateway",
    "gateways",
    multiple=True,
    metavar="G",
    help="razorpay or stripe (repeatable; default: every configured gateway).",
)
@click.option("--from", "first", metavar="DATE", help="First day, YYYY-MM-DD, in TIMEZONE.")
@click.option(
    "--to", "last", metavar="DATE", help="Last day, YYYY-MM-DD, included (default: --from)."
)
@click.option("--show", "show", type=int, metavar="RUN", help="Print a past run's discrepancies.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def reconcile(
    gateways: tuple[str, ...], first: str | None, last: str | None, show: int | None, as_json: bool
) -> None:
    """Reconcile the gateways' payments of whole days with the database, here and now.

    Each gateway and day is one run, the same the nightly job makes: a run left unfinished is
    resumed, a day already reconciled is reconciled again. Progress goes to stderr, the report
    to stdout. Exits 1 if a run could not finish.
    """
    from workers import reconcile_cli

    if show is not None:
        if first or last or gateways:
            raise click.ClickException("--show RUN takes no --gateway, --from or --to")
        reconcile_cli.show(show, as_json)
        return
    if not first:
        raise click.ClickException("--from DATE is required (or --show RUN)")
    ok = reconcile_cli.run(gateways, first, last or first, as_json)
    sys.exit(0 if ok else 1)


@main.group()
def demo() -> None:
    """The demo workload of `make run`."""


@demo.command("seed")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def demo_seed(as_json: bool) -> None:
    """Seed demo holds and refunds into an empty database (does nothing otherwise)."""
    from workers import celery_app  # noqa: F401  (the after-commit sends need the app)
    from workers.base import utcnow
    from workers.db import session_scope
    from workers.demo import seed, seed_notifications, seed_reconciliation, seed_refunds

    with session_scope() as session:
        ids = seed(session, utcnow())
        refunds = seed_refunds(session, utcnow())
        notifications = seed_notifications(session, utcnow())
        payments = seed_reconciliation(session, utcnow())
    if as_json:
        click.echo(
            json.dumps(
                {
                    "seeded_holds": ids,
                    "seeded_refunds": refunds,
                    "seeded_notifications": notifications,
                    "seeded_payments": payments,
                }
            )
        )
        return
    if payments:
        click.echo(
            "demo: seeded yesterday's payments; the nightly reconciliation runs in a few "
            "seconds on the batch worker: 2 fixed, 4 discrepancies for review "
            "(then: backstop reconcile --show RUN); the in-flight janitor completes one "
            "stuck payment",
            err=True,
        )
    if notifications:
        click.echo(
            f"demo: seeded {len(notifications)} notifications (SMS and push, on the local "
            "sandbox): the SMS is retried with backoff, one push is delivered, the push to a "
            "stale device token lands in the dead-letter queue",
            err=True,
        )
    if refunds:
        click.echo(
            f"demo: seeded {len(refunds)} refunds (Razorpay and Stripe, on the local "
            "simulator); each fails once and is retried to completion",
            err=True,
        )
    if ids:
        click.echo(
            f"demo: seeded {len(ids)} holds expiring over the next minute "
            f"(ids {ids[0]}..{ids[-1]}); watch them expire here and on "
            "http://127.0.0.1:5555",
            err=True,
        )
        click.echo(
            f'demo: one holds.expire was sent with "hold_id": "{ids[0]}" (a string) on purpose; '
            "see its dead letter with `.venv/bin/backstop dlq list` and replay it fixed with "
            f"`.venv/bin/backstop dlq replay ID --payload '{{\"hold_id\": {ids[0]}}}'`",
            err=True,
        )
    else:
        click.echo("demo: the database already has holds; nothing seeded", err=True)


@demo.command("prune-broker")
def demo_prune_broker() -> None:
    """Before `make run` starts: drop stale fanout bindings of the embedded broker."""
    from config import get_settings
    from config.settings import VAR_DIR
    from workers.demo import prune_embedded_broker

    if get_settings().BROKER_URL != "filesystem://":
        raise click.ClickException("prune-broker is only for the embedded filesystem broker")
    removed = prune_embedded_broker(VAR_DIR / "broker")
    click.echo(f"embedded broker: {removed} stale event messages removed", err=True)


@main.group()
def tasks() -> None:
    """The task contract for other services."""


@tasks.command("schema")
@click.option("--check", is_flag=True, help="Fail if docs/task-schemas is not up to date.")
def tasks_schema(check: bool) -> None:
    """Write the JSON Schema of every public task's payload to docs/task-schemas/."""
    from workers.client import SCHEMA_DIR, UnknownTask, schema_files

    try:
        files = schema_files()
    except UnknownTask as exc:
        raise click.ClickException(str(exc)) from None
    stale = [path for path, text in files.items() if not path.exists() or path.read_text() != text]
    if check:
        if stale:
            names = ", ".join(path.name for path in stale)
            raise click.ClickException(
                f"task schemas out of date: {names}; run `backstop tasks schema`"
            )
        click.echo(f"{len(files)} task schemas up to date")
        return
    SCHEMA_DIR.mkdir(parents=True, exist_ok=True)
    for path in stale:
        path.write_text(files[path])
    click.echo(f"{len(stale)} of {len(files)} task schemas written to {SCHEMA_DIR}")


def _add_commands() -> None:
    from workers.dlq_cli import dlq
    from workers.metrics_cli import metrics

    main.add_command(dlq)
    main.add_command(metrics)


_add_commands()

if __name__ == "__main__":
    sys.exit(main())
