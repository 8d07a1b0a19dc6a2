"""Alembic migrations, run by `backstop db upgrade` and by the test suite.

The scripts ship inside the package (`workers/db/migrations/`), so an installed backstop finds
them from any directory; the repository's `alembic.ini` names the same location for developers.
"""

from __future__ import annotations

from alembic import command
from alembic.config import Config

# Alembic resolves `package:folder` through importlib.resources, wherever the package is.
SCRIPT_LOCATION = "workers.db:migrations"


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    if url:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)
