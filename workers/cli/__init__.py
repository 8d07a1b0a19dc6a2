"""The `backstop` command line: one click group, and one module per command under
`workers/cli/`, each added here. A command imports what only it needs (the Celery app, the
stand-ins) inside its body, so `backstop --help` and the other commands start fast. Settings
are read by the commands that need them (`config.get_settings`, which stops the process with
one line naming a bad one), so `--help` and `--version` work whatever the environment."""

from __future__ import annotations

import sys

import click

from workers.cli.console import console
from workers.cli.db import db
from workers.cli.devtools import demo, notify_sandbox, simulator
from workers.cli.dlq import dlq
from workers.cli.health import health
from workers.cli.jobs import jobs
from workers.cli.metrics import metrics
from workers.cli.reconcile import reconcile
from workers.cli.refunds import refunds
from workers.cli.schemas import tasks
from workers.cli.settings import config_group


@click.group()
@click.version_option(package_name="backstop", prog_name="backstop")
def main() -> None:
    """backstop: the background-worker system of the bookings-and-payments platform."""


for command in (
    db,
    simulator,
    notify_sandbox,
    config_group,
    health,
    reconcile,
    demo,
    tasks,
    dlq,
    refunds,
    jobs,
    metrics,
    console,
):
    main.add_command(command)

if __name__ == "__main__":
    sys.exit(main())
