"""The Alembic scripts live in the package; `backstop db upgrade` and a developer's `alembic`
(through the repository's alembic.ini) run the same ones. The installed-wheel case is
tests/test_package.py."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from alembic.script import ScriptDirectory

from tests.processes import ROOT
from workers.db import migrate


def head() -> str:
    return ScriptDirectory.from_config(migrate.alembic_config()).get_current_head()


def version_of(database: Path) -> list[tuple[str]]:
    with sqlite3.connect(database) as conn:
        return conn.execute("SELECT version_num FROM alembic_version").fetchall()


def test_the_scripts_are_found_inside_the_package() -> None:
    scripts = ScriptDirectory.from_config(migrate.alembic_config())
    assert Path(scripts.dir) == Path(migrate.__file__).with_name("migrations")
    assert not (ROOT / "migrations").exists()


def test_developers_alembic_runs_the_packaged_scripts(tmp_path: Path) -> None:
    database = tmp_path / "dev.sqlite"
    subprocess.run(
        [Path(sys.executable).with_name("alembic"), "upgrade", "head"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": f"sqlite:///{database}"},
        check=True,
        timeout=60,
    )
    assert version_of(database) == [(head(),)]


def test_backstop_db_upgrade_works_from_another_directory(tmp_path: Path) -> None:
    database = tmp_path / "elsewhere.sqlite"
    subprocess.run(
        [Path(sys.executable).with_name("backstop"), "db", "upgrade"],
        cwd=tmp_path,
        env={**os.environ, "DATABASE_URL": f"sqlite:///{database}"},
        check=True,
        timeout=60,
    )
    assert version_of(database) == [(head(),)]
