"""The work behind `backstop reconcile`: runs of whole days reconciled in this process, with a
progress bar on stderr and a report (a table, or JSON) on stdout; a past run's report."""

from __future__ import annotations

import getpass
import json
import socket
import sys
from datetime import date
from typing import Any
from zoneinfo import ZoneInfo

import click
from sqlalchemy import func, select

from config import get_settings
from workers.base import utcnow
from workers.cli.output import table
from workers.db import new_session, session_scope, steps_on_one_connection
from workers.errors import BackstopError, one_line
from workers.gateways.base import GatewayPermanent
from workers.gateways.registry import get_gateway
from workers.models import Payment
from workers.reconciliation import (
    GATEWAYS,
    TYPES,
    RunOptions,
    RunState,
    configured_gateways,
    day_window,
    discrepancies,
    new_owner,
    open_runs,
    reconcile_run,
    run_report,
)

MAX_DAYS = 92
PAGE = 100


def parse_day(option: str, value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise click.ClickException(f"bad {option} date {value!r}: expected YYYY-MM-DD") from None


def check_gateways(names: tuple[str, ...]) -> list[str]:
    settings = get_settings()
    for name in names:
        if name not in GATEWAYS:
            raise click.ClickException(
                f"unknown gateway {name!r}: expected {' or '.join(GATEWAYS)}"
            )
    chosen = list(dict.fromkeys(names)) or configured_gateways(settings)
    if not chosen:
        raise click.ClickException(
            "no gateway is configured: set RAZORPAY_KEY_ID or STRIPE_API_KEY"
        )
    for name in chosen:
        try:
            get_gateway(name)
        except GatewayPermanent as exc:  # not configured: the message names the settings
            raise click.ClickException(one_line(exc)) from None
    return chosen


def run_days(gateways: tuple[str, ...], first_text: str, last_text: str, as_json: bool) -> bool:
    """Reconcile every gateway and day; returns whether every run completed."""
    first, last = parse_day("--from", first_text), parse_day("--to", last_text)
    if last < first:
        raise click.ClickException(f"--to {last} is before --from {first}")
    if (last - first).days >= MAX_DAYS:
        raise click.ClickException(f"at most {MAX_DAYS} days at once ({first}..{last} asked)")
    chosen = check_gateways(gateways)
    settings = get_settings()
    zone = ZoneInfo(settings.TIMEZONE)
    actor = f"cli:{getpass.getuser()}@{socket.gethostname()}"
    with session_scope() as session:
        run_ids = open_runs(
            session, chosen, first, last, zone=zone, now=utcnow(), actor=actor[:128]
        )
        estimate = estimate_pages(session, chosen, first, last, zone)
    options = RunOptions.from_settings(settings, owner=new_owner("cli"), actor=actor[:128])
    results: list[dict[str, Any]] = []
    done = 0
    with click.progressbar(
        length=max(estimate, 1),
        label=f"reconciling {', '.join(chosen)} {first}..{last}",
        file=sys.stderr,
        show_pos=True,
        item_show_func=lambda text: text,
    ) as bar:

        def progress(state: RunState) -> None:
            pages = done + state.counts["pages"]
            if pages >= bar.length:
                bar.length = pages + 1
            found = sum(state.counts[kind] for kind in TYPES)
            bar.update(
                max(pages - bar.pos, 0),
                f"{state.gateway} {state.window_start.date()}: {state.counts['pages']} pages, "
                f"{state.counts['payments']:,} payments, {found} discrepancies",
            )

        for run_id in run_ids:
            outcome, error = "failed", None
            session = new_session()
            try:
                with steps_on_one_connection(session) as steps:
                    result = reconcile_run(
                        steps, run_id, utcnow, get_gateway, options, progress=progress
                    )
                outcome = result.outcome
                if result.holder:
                    error = f"held by {result.holder}"
            except (BackstopError, OSError) as exc:
                error = one_line(exc)
            finally:
                session.close()
            with session_scope() as session:  # the first hundred findings; --show has all
                report = run_report(session, run_id, limit=100) or {"run_id": run_id}
            done += int(report.get("counts", {}).get("pages", 0))
            results.append({**report, "outcome": outcome, "problem": error})
    if as_json:
        click.echo(json.dumps({"runs": results}, default=str))
    else:
        print_table(results)
    return all(result["outcome"] in ("completed", "already_completed") for result in results)


def estimate_pages(
    session: Any, gateways: list[str], first: date, last: date, zone: ZoneInfo
) -> int:
    """The pages the runs will read, from the database's count of payments (a guess: the
    gateway's count is what matters), at least one per hourly slice."""
    start, _ = day_window(first, zone)
    _, end = day_window(last, zone)
    count = session.execute(
        select(func.count()).where(
            Payment.gateway.in_(gateways), Payment.created_at >= start, Payment.created_at < end
        )
    ).scalar_one()
    hours = int((end - start).total_seconds() // 3600) * len(gateways)
    return hours + -(-count // PAGE)


COLUMNS = ("run", "gateway", "day", "outcome", "payments", "fixed", *TYPES)


def print_table(results: list[dict[str, Any]]) -> None:
    rows = []
    for result in results:
        counts = result.get("counts", {})
        rows.append(
            [
                str(result["run_id"]),
                result.get("gateway", "?"),
                str(result.get("window_start", "?"))[:10],
                result["outcome"],
                f"{counts.get('payments', 0):,}",
                str(counts.get("fixed", 0)),
                *(str(counts.get(kind, 0)) for kind in TYPES),
            ]
        )
    click.echo(table(COLUMNS, rows, right=COLUMNS[4:]))
    for result in results:
        if result.get("problem"):
            click.echo(f"run {result['run_id']}: {result['outcome']}: {result['problem']}")
    flagged = sum(int(result.get("counts", {}).get("flagged", 0)) for result in results)
    if flagged:
        click.echo(f"{flagged} discrepancies need review: backstop reconcile --show RUN")


def show_run(run_id: int, as_json: bool) -> None:
    """Every discrepancy of the run, written as they are read."""
    with session_scope() as session:
        report = run_report(session, run_id, limit=0)
        if report is None:
            raise click.ClickException(f"no reconciliation run {run_id}")
        found = discrepancies(session, run_id)
        if as_json:
            head = json.dumps({**report, "discrepancies": []}, default=str)
            click.echo(head[: -len("[]}")] + "[", nl=False)
            for index, row in enumerate(found):
                click.echo(("," if index else "") + json.dumps(row, default=str), nl=False)
            click.echo("]}")
            return
        print_run(report, found)


def print_run(report: dict[str, Any], found: Any) -> None:
    counts = report["counts"]
    click.echo(
        f"run {report['run_id']}: {report['gateway']} {report['window_start']} .. "
        f"{report['window_end']}, {report['status']}, started by {report['actor']}"
    )
    click.echo(
        f"  {counts.get('payments', 0):,} payments listed, {counts.get('fixed', 0)} fixed, "
        f"{counts.get('flagged', 0)} need review"
        + (f"; error: {report['error']}" if report["error"] else "")
    )
    for row in found:
        details = " ".join(f"{key}={value}" for key, value in sorted(row["details"].items()))
        click.echo(
            f"  {row['type']:<19} {review_word(row):<12} "
            f"payment={row['payment_id'] or '-'} gateway={row['gateway_payment_id'] or '-'} "
            f"{details}"
        )


def review_word(row: dict[str, Any]) -> str:
    """fixed (by the run), REVIEW (waits for a person), ACKNOWLEDGED or RESOLVED (by one)."""
    if row["fixed"]:
        return "fixed"
    return "REVIEW" if row["review"] == "OPEN" else str(row["review"])
