"""backstop as a real package: a wheel built from the sources alone, installed non-editable
with production's lock into a fresh virtualenv that cannot see this checkout, migrates a new
database and runs the Procfile's worker, which completes a task sent by name. The Dockerfile
installs it the same way (tests/test_deploy_files.py checks that it does)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from celery import Celery
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import BROKER_URL, DATABASE_URL, wait_until
from tests.processes import ROOT, Proc
from tests.test_deploy_files import WHEEL_SOURCES, procfile
from workers.db import migrate

pytestmark = pytest.mark.e2e

LOCK = ROOT / "requirements" / "production.txt"


def run(argv: list[str | Path], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(arg) for arg in argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture
def database() -> Iterator[str]:
    """A new, empty database on the suite's PostgreSQL, dropped afterwards."""
    name = f"backstop_pkg_{uuid.uuid4().hex[:8]}"
    admin = create_engine(DATABASE_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield make_url(DATABASE_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    source.mkdir()
    for name in WHEEL_SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", "dist", "./src"],
        tmp_path,
    )
    [wheel] = (tmp_path / "dist").glob("backstop-*.whl")
    return wheel


def install(tmp_path: Path, wheel: Path) -> Path:
    """A fresh virtualenv with production's lock and the wheel, as the Dockerfile installs."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], tmp_path)
    pip = [venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "install", "--quiet", "--require-hashes", "--no-deps", "-r", LOCK], tmp_path)
    run([*pip, "install", "--quiet", "--no-deps", wheel], tmp_path)
    run([*pip, "check"], tmp_path)
    return venv


def test_the_wheel_installs_migrates_and_runs_a_worker(tmp_path: Path, database: str) -> None:
    venv = install(tmp_path, build_wheel(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    broker = BROKER_URL.rsplit("/", 1)[0] + "/9"  # a Redis database of its own
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(elsewhere),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "DATABASE_URL": database,
        "BROKER_URL": broker,
        "BACKSTOP_VAR_DIR": str(elsewhere / "var"),
    }

    # Everything is imported from the venv, and every module imports with production's
    # dependencies alone (no test or demo package is needed at run time).
    site = run(
        [
            venv / "bin" / "python",
            "-c",
            "import importlib, pkgutil, sysconfig, config, tasks, workers\n"
            "for package in (config, tasks, workers):\n"
            "    for module in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
            "        if not module.name.endswith('.__main__'):\n"
            "            importlib.import_module(module.name)\n"
            "print(sysconfig.get_paths()['purelib'])\n"
            "for package in (config, tasks, workers): print(package.__file__)",
        ],
        elsewhere,
        env,
    ).split()
    assert all(Path(path).is_relative_to(site[0]) for path in site[1:]), site
    assert Path(site[0]).is_relative_to(venv)

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert run(["backstop", "--version"], elsewhere, env).strip() == f"backstop, version {version}"

    run(["backstop", "db", "upgrade"], elsewhere, env)
    engine = create_engine(database)
    try:
        with engine.begin() as conn:
            head = ScriptDirectory.from_config(migrate.alembic_config()).get_current_head()
            assert conn.scalar(text("SELECT version_num FROM alembic_version")) == head
            hold = conn.scalar(
                text(
                    "INSERT INTO booking_holds (resource_id, user_id, start_time, end_time, "
                    "expires_at) VALUES ('room-1', 'user-1', :start, :end, :due) RETURNING id"
                ),
                {
                    "start": datetime.now(UTC) + timedelta(days=1),
                    "end": datetime.now(UTC) + timedelta(days=1, hours=1),
                    "due": datetime.now(UTC) - timedelta(seconds=1),
                },
            )

        worker = Proc(
            ["sh", "-c", f"exec {procfile()['worker']} --without-gossip --without-mingle"],
            env,
            tmp_path / "worker.log",
            cwd=elsewhere,
        )
        try:
            worker.wait_for("ready.")
            sender = Celery(broker=broker)
            sender.send_task("holds.expire", kwargs={"hold_id": hold}, queue="critical")

            def status() -> str:
                with engine.connect() as conn:
                    return conn.scalar(
                        text("SELECT status FROM booking_holds WHERE id = :id"), {"id": hold}
                    )

            wait_until(lambda: status() == "EXPIRED", timeout=60)
            sender.close()
        finally:
            assert worker.stop() == 0, worker.output()[-3000:]
        assert "holds.expire" in worker.output()
        assert str(ROOT) not in worker.output()
    finally:
        engine.dispose()
