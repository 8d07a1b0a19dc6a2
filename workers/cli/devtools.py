"""The commands that start the local stand-ins of `make run`: `backstop simulator`,
`backstop notify-sandbox`, `backstop demo`. The only production code that imports
`workers.devtools`, and only inside the commands."""

from __future__ import annotations

import json

import click

from workers.cli.database import needs_database
from workers.cli.options import listen_options


@click.command()
@listen_options(8765)
@click.option("--demo", is_flag=True, help="Start with the payments and faults of `make run`.")
def simulator(address: str, port: int, demo: bool) -> None:
    """Run the local Razorpay/Stripe simulator (point RAZORPAY_BASE_URL/STRIPE_API_BASE at it).

    It accepts the credentials in RAZORPAY_KEY_ID/RAZORPAY_KEY_SECRET/STRIPE_API_KEY, or its
    own test ones when those are unset. Never for production traffic.
    """
    from config import get_settings
    from workers.devtools.simulator import serve

    settings = get_settings()
    credentials = {}
    if settings.RAZORPAY_KEY_ID and settings.RAZORPAY_KEY_SECRET:
        credentials["razorpay_key_id"] = settings.RAZORPAY_KEY_ID
        credentials["razorpay_key_secret"] = settings.RAZORPAY_KEY_SECRET.get_secret_value()
    if settings.STRIPE_API_KEY:
        credentials["stripe_api_key"] = settings.STRIPE_API_KEY.get_secret_value()
    if demo:
        from workers.devtools.demo import seed_simulator

        serve(address, port, setup=seed_simulator, **credentials)
    else:
        serve(address, port, **credentials)


@click.command("notify-sandbox")
@listen_options(8766)
@click.option("--demo", is_flag=True, help="Start with the faults of `make run`.")
def notify_sandbox(address: str, port: int, demo: bool) -> None:
    """Run the local SMS and push provider (point SMS_PROVIDER_URL/PUSH_PROVIDER_URL at it).

    It accepts the API key `sandbox-key`. Never for production traffic.
    """
    from workers.devtools.sandbox import serve

    if demo:
        from workers.devtools.demo import seed_sandbox

        serve(address, port, setup=seed_sandbox)
    else:
        serve(address, port)


@click.group()
def demo() -> None:
    """The demo workload of `make run`."""


@demo.command("seed")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@needs_database
def demo_seed(as_json: bool) -> None:
    """Seed demo holds and refunds into an empty database (does nothing otherwise)."""
    from workers import celery_app  # noqa: F401  (the after-commit sends need the app)
    from workers.base import utcnow
    from workers.db import session_scope
    from workers.devtools.demo import seed, seed_notifications, seed_reconciliation, seed_refunds

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
            "simulator); two fail once and are retried to completion, one waits in manual "
            "review (console: Refunds)",
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
    from workers.devtools.demo import prune_embedded_broker

    if get_settings().BROKER_URL != "filesystem://":
        raise click.ClickException("prune-broker is only for the embedded filesystem broker")
    removed = prune_embedded_broker(VAR_DIR / "broker")
    click.echo(f"embedded broker: {removed} stale event messages removed", err=True)
