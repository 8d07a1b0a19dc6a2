"""`backstop health`: the checks a container probe and an operator run."""

from __future__ import annotations

import json
import sys

import click


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
        width = max(len(check.name) for check in results)
        for check in results:
            click.echo(f"{check.name:<{width}}  {check.status:<9}  {check.detail}")
        click.echo(f"{'overall':<{width}}  {status}")
    sys.exit(checks.LEVELS[status])
