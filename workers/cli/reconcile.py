"""`backstop reconcile`: whole days reconciled here and now, or a past run shown; the recent
runs, a run's findings, and a finding acknowledged or resolved (as the console does)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from workers.cli.database import needs_database, require_database
from workers.cli.options import RequiredUnless, actor_option
from workers.cli.output import table
from workers.models import DISCREPANCY_STATUSES, DISCREPANCY_TYPES


@click.group(invoke_without_command=True)
@click.option(
    "--gateway",
    "gateways",
    multiple=True,
    metavar="G",
    help="razorpay or stripe (repeatable; default: every configured gateway).",
)
@click.option(
    "--from",
    "first",
    metavar="DATE",
    cls=RequiredUnless,
    unless="--show",
    help="First day, YYYY-MM-DD, in TIMEZONE.",
)
@click.option(
    "--to", "last", metavar="DATE", help="Last day, YYYY-MM-DD, included (default: --from)."
)
@click.option("--show", "show", type=int, metavar="RUN", help="Print a past run's discrepancies.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def reconcile(
    ctx: click.Context,
    gateways: tuple[str, ...],
    first: str | None,
    last: str | None,
    show: int | None,
    as_json: bool,
) -> None:
    """Reconcile the gateways' payments of whole days with the database, here and now.

    Each gateway and day is one run, the same the nightly job makes: a run left unfinished is
    resumed, a day already reconciled is reconciled again. Progress goes to stderr, the report
    to stdout. Exits 1 if a run could not finish.

    The subcommands list the recent runs, a run's findings, and acknowledge or resolve
    findings.
    """
    if ctx.invoked_subcommand is not None:
        return
    # Imported here: it builds the Celery app and the gateways, which no other command needs.
    from workers.cli.reconciling import run_days, show_run

    if show is not None:
        if first or last or gateways:
            raise click.ClickException("--show RUN takes no --gateway, --from or --to")
        require_database()
        show_run(show, as_json)
        return
    if not first:
        raise click.ClickException("--from DATE is required (or --show RUN)")
    require_database()
    ok = run_days(gateways, first, last or first, as_json)
    sys.exit(0 if ok else 1)


@reconcile.command("runs")
@click.option("--limit", default=30, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--gateway", help="Only this gateway's runs.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@needs_database
def reconcile_runs(limit: int, gateway: str | None, as_json: bool) -> None:
    """The recent runs, newest first: window, status, counts, duration, and how many of their
    findings wait for a person."""
    from workers.db import session_scope
    from workers.reconciliation.review import recent_runs

    with session_scope() as session:
        runs = recent_runs(session, limit=limit, gateway=gateway)
    if as_json:
        click.echo(json.dumps(runs, default=str))
        return
    if not runs:
        click.echo("no reconciliation runs")
        return
    click.echo(
        table(
            ("run", "gateway", "window start", "status", "payments", "fixed", "waiting", "took"),
            [
                (
                    str(run["id"]),
                    run["gateway"],
                    run["window_start"].isoformat(timespec="minutes"),
                    run["status"],
                    str(run["counts"].get("payments", 0)),
                    str(run["counts"].get("fixed", 0)),
                    str(run["waiting"]),
                    "-" if run["seconds"] is None else f"{run['seconds']:.1f}s",
                )
                for run in runs
            ],
            right=("run", "payments", "fixed", "waiting", "took"),
        )
    )


@reconcile.command("findings")
@click.argument("run_id", type=int)
@click.option("--type", "kind", type=click.Choice(DISCREPANCY_TYPES), help="Only this type.")
@click.option("--review", type=click.Choice(DISCREPANCY_STATUSES), help="Only this review.")
@click.option("--waiting", is_flag=True, help="Only what waits for a person.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--after", default=0, type=int, help="Only findings with a higher id (paging).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@needs_database
def reconcile_findings(
    run_id: int,
    kind: str | None,
    review: str | None,
    waiting: bool,
    limit: int,
    after: int,
    as_json: bool,
) -> None:
    """A run's findings, filtered, in the order they were found."""
    from workers.db import session_scope
    from workers.errors import NotFound
    from workers.reconciliation.review import FindingFilters, findings, run_of

    with session_scope() as session:
        try:
            run_of(session, run_id)
        except NotFound as exc:
            raise click.ClickException(str(exc)) from None
        rows = findings(
            session, run_id, FindingFilters(kind, review, waiting), limit=limit, after=after
        )
    items = [finding_dict(row) for row in rows]
    if as_json:
        click.echo(json.dumps(items, default=str))
        return
    if not items:
        click.echo("no findings match")
        return
    click.echo(
        table(
            ("id", "type", "fixed", "review", "payment", "gateway payment", "details"),
            [
                (
                    str(item["id"]),
                    item["type"],
                    "yes" if item["fixed"] else "no",
                    item["review"],
                    str(item["payment_id"] or "-"),
                    item["gateway_payment_id"] or "-",
                    " ".join(f"{k}={v}" for k, v in sorted(item["details"].items()))[:70],
                )
                for item in items
            ],
            right=("id", "payment"),
        )
    )


def finding_dict(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "type": row.type,
        "payment_id": row.payment_id,
        "gateway_payment_id": row.gateway_payment_id,
        "fixed": row.fixed,
        "review": row.status,
        "details": row.details,
        "updated_at": row.updated_at.isoformat(),
    }


def review_command(
    to: str, finding_ids: tuple[int, ...], reason: str, actor: str, as_json: bool
) -> None:
    from workers.base import utcnow
    from workers.db import session_scope
    from workers.reconciliation.review import review

    try:
        with session_scope() as session:
            outcomes = review(
                session, list(finding_ids), to, actor=actor, reason=reason, now=utcnow()
            )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps([{"id": i, "outcome": said} for i, said in outcomes]))
    else:
        for _, said in outcomes:
            click.echo(said)
    if any("does not exist" in said for _, said in outcomes):
        sys.exit(1)


@reconcile.command("acknowledge")
@click.argument("finding_ids", nargs=-1, type=int, required=True)
@click.option("--reason", required=True, help="Who is on it, and what they are doing.")
@actor_option
@click.option("--json", "as_json", is_flag=True, help="Print the outcomes as JSON.")
@needs_database
def reconcile_acknowledge(
    finding_ids: tuple[int, ...], reason: str, actor: str, as_json: bool
) -> None:
    """Say that someone is on these findings (OPEN -> ACKNOWLEDGED), audited."""
    review_command("ACKNOWLEDGED", finding_ids, reason, actor, as_json)


@reconcile.command("resolve")
@click.argument("finding_ids", nargs=-1, type=int, required=True)
@click.option("--reason", required=True, help="What was done about them.")
@actor_option
@click.option("--json", "as_json", is_flag=True, help="Print the outcomes as JSON.")
@needs_database
def reconcile_resolve(finding_ids: tuple[int, ...], reason: str, actor: str, as_json: bool) -> None:
    """Close these findings (-> RESOLVED) with what was done, audited."""
    review_command("RESOLVED", finding_ids, reason, actor, as_json)
