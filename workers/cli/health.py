"""`backstop health`: the checks a container probe and an operator run."""

from __future__ import annotations

import json
import sys

import click

from workers.cli.output import table


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def health(as_json: bool) -> None:
    """Check database, broker, gateways, schedules and dead letters.

    Exits 0 when healthy, 1 when degraded, 2 when unhealthy (usable as a container check).
    """
    from config import get_settings
    from workers.base import utcnow
    from workers.observability import health as checks

    results = checks.run_checks(get_settings(), utcnow())
    status = checks.overall(results)
    if as_json:
        click.echo(json.dumps(checks.as_json(results)))
    else:
        rows = [(check.name, check.status, check.detail) for check in results]
        click.echo(table(("check", "status", "detail"), [*rows, ("overall", status, "")]))
    sys.exit(checks.LEVELS[status])
