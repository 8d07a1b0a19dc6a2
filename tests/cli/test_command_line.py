"""The `backstop` command line as a whole, run as the installed script in a fresh process:
help and version whatever the environment, settings read only when a command needs them."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import click
import pytest

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
