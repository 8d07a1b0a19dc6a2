"""Flower for operators, run as `make run` runs it: the Procfile's `flower` entry, with basic
auth for the user `demo` and the password `make run` makes and prints
(`var/console-demo-password`, the console's demo operator's). Here on the real Redis broker: it
refuses its API without the credentials and replays a dead letter through its task API
(`POST /api/task/send-task/dlq.replay`) with them, as the README's example does."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from sqlalchemy import Engine

from tests.conftest import service_env, wait_until
from tests.processes import ROOT, Proc
from tests.services import _free_port
from tests.tasks.test_dlq_worker import letter, new_letter
from tests.test_deploy_files import procfile
from tests.workers.factories import add_hold
from workers.db import session_scope

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Flower:
    url: str
    var_dir: Path  # BACKSTOP_VAR_DIR, with the demo password in it
    auth: tuple[str, str]
    log: Path


@pytest.fixture
def flower(committed: Engine, tmp_path: Path) -> Iterator[Flower]:
    var_dir = tmp_path / "var"
    var_dir.mkdir()
    # The demo password as `make run` makes it, kept in var/ for the console and Flower.
    password = secrets.token_urlsafe(12)
    (var_dir / "console-demo-password").write_text(password + "\n")
    port = _free_port()
    env = service_env(
        FLOWER_BASIC_AUTH=f"demo:{password}",
        FLOWER_PORT=str(port),
        BACKSTOP_VAR_DIR=str(var_dir),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    # honcho runs a Procfile entry through the shell, with make run's PATH and environment.
    proc = Proc(["sh", "-c", f"exec {procfile()['flower']}"], env, tmp_path / "flower.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(url), timeout=30)
        yield Flower(url, var_dir, ("demo", password), proc.log)
    finally:
        proc.stop()


def _up(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code in (200, 401)
    except requests.ConnectionError:
        return False


@dataclass(frozen=True)
class CurlExample:
    user: str
    password_file: str
    path: str
    body: dict  # type: ignore[type-arg]


def readme_example() -> CurlExample:
    """The README's `curl` replaying a dead letter through Flower, read as curl would."""
    readme = (ROOT / "README.md").read_text()
    [command] = re.findall(r"^curl .*?send-task/dlq\.replay$", readme, re.M | re.S)
    argv = shlex.split(command.replace("\\\n", " "))
    user, secret = argv[argv.index("-u") + 1].split(":", 1)
    [password_file] = re.fullmatch(r"\$\(cat (\S+)\)", secret).groups()  # type: ignore[union-attr]
    assert argv[argv.index("-H") + 1] == "Content-Type: application/json"
    return CurlExample(
        user, password_file, urlsplit(argv[-1]).path, json.loads(argv[argv.index("-d") + 1])
    )


def test_make_run_gives_flower_basic_auth_with_the_printed_demo_password() -> None:
    recipe = (ROOT / "Makefile").read_text().split("\nrun: install\n", 1)[1].split("\n\n")[0]
    assert "pw=$$(cat var/console-demo-password)" in recipe
    assert 'export FLOWER_BASIC_AUTH="demo:$$pw"' in recipe
    assert re.search(r'echo "flower: +http://127\.0\.0\.1:5555 +\(user demo, ', recipe)


def test_flower_refuses_without_auth_and_replays_a_dead_letter_by_the_readmes_example(
    flower: Flower, start_worker: Callable[..., Proc]
) -> None:
    example = readme_example()
    assert (example.user, example.password_file) == ("demo", "var/console-demo-password")
    auth = (example.user, (flower.var_dir / "console-demo-password").read_text().strip())
    assert auth == flower.auth
    assert requests.get(f"{flower.url}/tasks", timeout=5).status_code == 401
    assert requests.get(f"{flower.url}/tasks", auth=("demo", "wrong"), timeout=5).status_code == 401
    assert requests.get(f"{flower.url}/tasks", auth=auth, timeout=5).status_code == 200
    start_worker()
    with session_scope() as session:
        hold = add_hold(session, datetime.now(UTC) - timedelta(seconds=5))
    letter_id = new_letter("holds.expire", {"hold_id": hold})
    body = {"kwargs": {**example.body["kwargs"], "dead_letter_id": letter_id}}
    denied = requests.post(f"{flower.url}{example.path}", json=body, timeout=5)
    assert denied.status_code == 401 and letter(letter_id).status == "NEW"
    sent = requests.post(f"{flower.url}{example.path}", json=body, auth=auth, timeout=5)
    assert sent.status_code == 200, sent.text
    wait_until(lambda: letter(letter_id).status == "REPLAYED", timeout=30)
    assert flower.auth[1] not in flower.log.read_text()  # the password is never logged
