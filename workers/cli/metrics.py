"""`backstop metrics`: the Prometheus exporter."""

from __future__ import annotations

import click


@click.command()
@click.option("--address", default="127.0.0.1", show_default=True, envvar="METRICS_ADDRESS")
@click.option(
    "--port", default=9808, show_default=True, type=click.IntRange(1, 65535), envvar="METRICS_PORT"
)
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
