"""`backstop reconcile`: whole days reconciled here and now, or a past run shown."""

from __future__ import annotations

import sys

import click


@click.command()
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
    # Imported here: it builds the Celery app and the gateways, which no other command needs.
    from workers.cli.reconciling import run_days, show_run

    if show is not None:
        if first or last or gateways:
            raise click.ClickException("--show RUN takes no --gateway, --from or --to")
        show_run(show, as_json)
        return
    if not first:
        raise click.ClickException("--from DATE is required (or --show RUN)")
    ok = run_days(gateways, first, last or first, as_json)
    sys.exit(0 if ok else 1)
