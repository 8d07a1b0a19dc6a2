"""Commands that read the database first check that it is there, and stop with one line
saying where they looked when it is not, instead of creating an empty embedded database or
failing on a missing table."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click
from sqlalchemy.exc import OperationalError

from workers.db import DatabaseMissing, check_database
from workers.errors import one_line


def require_database() -> None:
    """Stop the command, saying where it looked, unless DATABASE_URL holds backstop's tables."""
    try:
        check_database()
    except DatabaseMissing as exc:
        raise click.ClickException(str(exc)) from None
    except OperationalError as exc:
        raise click.ClickException(
            f"cannot reach the database: {one_line(exc.orig or exc)}"
        ) from None


def needs_database(command: Callable[..., Any]) -> Callable[..., Any]:
    """A command that reads the database: checked once click has parsed its arguments, so
    `--help` never touches it. The innermost decorator, right above the function."""

    @functools.wraps(command)
    def checked(*args: Any, **kwargs: Any) -> Any:
        require_database()
        return command(*args, **kwargs)

    return checked
