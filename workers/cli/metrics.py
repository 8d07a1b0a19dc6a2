"""`backstop metrics`: the Prometheus exporter."""

from __future__ import annotations

import click

from workers.cli.options import listen_options


@click.command()
@listen_options(9808, env="METRICS")
def metrics(address: str, port: int) -> None:
    """Serve /metrics: every worker's task metrics and the business gauges.

    It has no authentication: keep it on a private network, for Prometheus only.
    """
    from config import get_settings
    from workers.observability import logs
    from workers.observability.business_metrics import serve

    settings = get_settings()
    logs.configure(settings)  # the exporter logs like the workers: LOG_LEVEL, LOG_FORMAT
    serve(settings, address, port)
