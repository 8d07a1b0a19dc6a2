"""`backstop db`: the database schema."""

from __future__ import annotations

from datetime import UTC, datetime

import click


@click.group()
def db() -> None:
    """The database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply the Alembic migrations to DATABASE_URL, and note the jobs of this release's
    schedule (a job that has never run is expected from the deployment that first had it)."""
    from config import get_settings
    from config.schedule import beat_schedule
    from workers.db import migrate, session_scope
    from workers.jobs import record_schedule

    migrate.upgrade(revision=revision)
    if revision == "head":
        jobs = [str(entry["task"]) for entry in beat_schedule(get_settings()).values()]
        with session_scope() as session:
            record_schedule(session, jobs, datetime.now(UTC))
    click.echo(f"database upgraded to {revision}", err=True)
