"""The `backstop` command line as a whole, run as the installed script in a fresh process:
help and version whatever the environment, settings read only when a command needs them."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import click
import pytest
import requests
from click.testing import CliRunner
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import DATABASE_URL, wait_until
from tests.processes import ROOT
from tests.services import _free_port
from workers.cli import main

BACKSTOP = str(Path(sys.executable).with_name("backstop"))


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command under `group`, groups and leaves, as the words that name it."""
    paths = []
    for name, command in sorted(group.commands.items()):
        path = (*prefix, name)
        paths.append(path)
        if isinstance(command, click.Group):
            paths.extend(command_paths(command, path))
    return paths


def backstop(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BACKSTOP, *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_command_tree_is_walked() -> None:
    paths = command_paths(main)
    assert ("dlq", "list") in paths and ("console", "hash-password") in paths
    assert ("reconcile", "runs") in paths and ("jobs",) in paths


@pytest.mark.parametrize("path", [(), *command_paths(main)], ids=lambda p: " ".join(p) or "root")
def test_help_works_with_a_bad_setting_in_the_environment(path: tuple[str, ...]) -> None:
    done = backstop(*path, "--help", TIMEZONE="Nowhere/City")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Usage: backstop {' '.join(path)}".rstrip())
    assert "bad setting" not in done.stdout + done.stderr


def test_version_is_the_installed_packages_whatever_the_environment() -> None:
    done = backstop("--version", TIMEZONE="Nowhere/City", HOLD_SWEEP_SECONDS="soon")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"backstop, version {version('backstop')}"


@pytest.mark.parametrize(
    "args", [("dlq", "list"), ("config", "show"), ("jobs", "list")], ids=" ".join
)
def test_a_command_that_needs_the_settings_still_stops_with_one_line(
    args: tuple[str, ...], tmp_path: Path
) -> None:
    done = backstop(*args, cwd=tmp_path, TIMEZONE="Nowhere/City")
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [
        "backstop: bad setting TIMEZONE: Value error, unknown time zone 'Nowhere/City'"
    ]
    assert done.stdout == ""


def embedded(var_dir: str | Path | None) -> dict[str, str]:
    """The environment of the embedded demo: no DATABASE_URL or BROKER_URL, and this
    BACKSTOP_VAR_DIR (None: unset, the default)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "BROKER_URL", "BACKSTOP_VAR_DIR")
    }
    if var_dir is not None:
        env["BACKSTOP_VAR_DIR"] = str(var_dir)
    return env


def run_embedded(
    var_dir: str | Path | None, cwd: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BACKSTOP, *args],
        env=embedded(var_dir),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_default_var_dir_is_the_checkouts_from_any_directory(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from config import settings as s; print(s.VAR_DIR); print(s.Settings().DATABASE_URL)",
        ],
        env=embedded(None),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        str(ROOT / "var"),
        f"sqlite:///{ROOT / 'var' / 'backstop.sqlite'}",
    ]
    assert list(tmp_path.iterdir()) == []


def test_a_relative_var_dir_is_the_checkouts_so_any_directory_finds_the_database(
    tmp_path: Path,
) -> None:
    var_dir = tmp_path / "demo-var"
    relative = os.path.relpath(var_dir, ROOT)
    assert not Path(relative).is_absolute()
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    upgraded = run_embedded(relative, here, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert (var_dir / "backstop.sqlite").is_file()
    listed = run_embedded(relative, there, "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() == "no dead letters match"
    assert list(here.iterdir()) == [] and list(there.iterdir()) == []


def test_a_missing_embedded_database_is_named_not_created(tmp_path: Path) -> None:
    var_dir = tmp_path / "var"
    done = run_embedded(var_dir, tmp_path, "dlq", "list")
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    database = var_dir / "backstop.sqlite"
    assert line.startswith(f"Error: no database at {database}: the file does not exist"), line
    assert f"BACKSTOP_VAR_DIR is {var_dir}" in line and "backstop db upgrade" in line
    assert not database.exists()
    health = run_embedded(var_dir, tmp_path, "health", "--json")
    assert health.returncode == 2
    [database_check] = [c for c in json.loads(health.stdout)["checks"] if c["name"] == "database"]
    assert database_check["status"] == "unhealthy"
    assert database_check["detail"].startswith(f"no database at {database}")
    assert not database.exists()


def test_a_database_without_tables_is_named(tmp_path: Path) -> None:
    var_dir = tmp_path / "var"
    var_dir.mkdir()
    database = var_dir / "backstop.sqlite"
    sqlite3.connect(database).close()
    done = run_embedded(var_dir, tmp_path, "jobs", "list")
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line == (
        f"Error: the database at {database} has no backstop tables: run `backstop db upgrade` first"
    )


def test_a_postgres_database_without_tables_is_named(tmp_path: Path) -> None:
    url = make_url(DATABASE_URL)
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS backstop_empty"))
        conn.execute(text("CREATE DATABASE backstop_empty"))
    admin.dispose()
    empty = url.set(database="backstop_empty").render_as_string(hide_password=False)
    done = backstop("refunds", "list", cwd=tmp_path, DATABASE_URL=empty)
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line == (
        f"Error: the database at {empty} has no backstop tables: run `backstop db upgrade` first"
    )


def help_line(help_text: str, option: str) -> str:
    """The help of one option, its wrapped lines joined."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(option))
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].strip().startswith("-")), len(lines)
    )
    return " ".join(" ".join(lines[start:end]).split())


@pytest.mark.parametrize(
    ("path", "option", "marker"),
    [
        (("reconcile",), "--from DATE", "[required unless --show]"),
        (("dlq", "discard"), "--reason", "[required]"),
        (("refunds", "retry"), "--reason", "[required]"),
        (("refunds", "resolve"), "--reason", "[required]"),
        (("reconcile", "acknowledge"), "--reason", "[required]"),
        (("reconcile", "resolve"), "--reason", "[required]"),
    ],
)
def test_required_options_say_so_in_their_help(
    path: tuple[str, ...], option: str, marker: str
) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert help_line(result.output, option).endswith(marker)


SERVERS = ("console", "metrics", "simulator", "notify-sandbox")


@pytest.mark.parametrize("name", SERVERS)
def test_every_server_listens_on_address_and_still_takes_host(name: str) -> None:
    command = main.commands[name]
    [address] = [param for param in command.params if param.name == "address"]
    assert address.opts[0] == "--address" and "--host" in address.opts
    assert address.default == "127.0.0.1"
    assert not any(param.name == "host" for param in command.params)


@pytest.mark.parametrize("flag", ["--address", "--host"])
def test_the_simulator_serves_on_the_address_given_either_way(flag: str, tmp_path: Path) -> None:
    port = _free_port()
    with (tmp_path / "simulator.log").open("wb") as log:
        proc = subprocess.Popen(
            [BACKSTOP, "simulator", flag, "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/"), timeout=30)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=1)
    except requests.ConnectionError:
        return False
    return True
