"""`backstop db`: the database schema."""

from __future__ import annotations

import click


@click.group()
def db() -> None:
    """The database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply the Alembic migrations to DATABASE_URL."""
    from workers.db import migrate

    migrate.upgrade(revision=revision)
    click.echo(f"database upgraded to {revision}", err=True)
