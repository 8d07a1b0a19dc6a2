"""The harness finds any installed PostgreSQL, and says in one line when there is none (which is
what `make postgresql` asks before installing one with apt)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import services
from tests.processes import ROOT


def fake_postgres(folder: Path, tools: tuple[str, ...] = services.PG_TOOLS) -> Path:
    folder.mkdir(parents=True)
    for tool in tools:
        (folder / tool).write_text("#!/bin/sh\n")
        (folder / tool).chmod(0o755)
    return folder


def find(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.services", "--find-postgres"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_this_machine_has_a_postgres_the_harness_runs() -> None:
    folder = services.find_postgres()
    version = subprocess.run(
        [str(folder / "initdb"), "--version"], capture_output=True, text=True, check=True
    )
    assert "PostgreSQL" in version.stdout


def test_pg_bindir_names_the_installation(tmp_path: Path) -> None:
    folder = fake_postgres(tmp_path / "pg" / "bin")
    answer = find({"PG_BINDIR": str(folder)})
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == str(folder)


def test_an_installation_missing_a_tool_is_not_used(tmp_path: Path) -> None:
    folder = fake_postgres(tmp_path / "pg" / "bin", ("initdb", "postgres", "pg_isready"))
    answer = find({"PG_BINDIR": str(folder)})
    assert answer.returncode == 1
    assert answer.stdout == ""
    [line] = answer.stderr.splitlines()
    assert line.startswith("services: no PostgreSQL server (")
    assert "createdb" in line and str(folder) in line and "apt" in line


def test_debian_majors_are_searched_newest_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PG_BINDIR", raising=False)
    for major in ("9.6", "15", "16", "13"):
        fake_postgres(tmp_path / major / "bin")
    found = [p for p in services._candidates(tmp_path) if p.is_relative_to(tmp_path)]
    assert [p.parent.name for p in found] == ["16", "15", "13", "9.6"]
