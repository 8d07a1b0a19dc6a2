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
    from workers.demo import seed, seed_reconciliation, seed_refunds

    with session_scope() as session:
        ids = seed(session, utcnow())
        refunds = seed_refunds(session, utcnow())
        payments = seed_reconciliation(session, utcnow())
    if as_json:
        click.echo(
            json.dumps(
                {"seeded_holds": ids, "seeded_refunds": refunds, "seeded_payments": payments}
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


if __name__ == "__main__":
    sys.exit(main())
