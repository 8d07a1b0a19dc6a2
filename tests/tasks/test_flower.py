"""Flower for operators: behind basic auth, on the real Redis broker, and able to replay a dead
letter through its task API (`POST /api/task/send-task/dlq.replay`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from sqlalchemy import Engine

from tests.conftest import service_env, wait_until
from tests.processes import CELERY, Proc
from tests.services import _free_port
from tests.tasks.test_dlq_worker import letter, new_letter
from tests.workers.factories import add_hold
from workers.db import session_scope

pytestmark = pytest.mark.e2e
AUTH = ("ops", "correct-horse-battery")


@pytest.fixture
def flower(committed: Engine, tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    proc = Proc(
        [
            *CELERY,
            "flower",
            "--address=127.0.0.1",
            f"--port={port}",
            f"--db={tmp_path / 'flower.db'}",
            "--persistent=True",
        ],
        service_env(FLOWER_BASIC_AUTH=":".join(AUTH)),
        tmp_path / "flower.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(url), timeout=30)
        yield url
    finally:
        proc.stop()


def _up(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code in (200, 401)
    except requests.ConnectionError:
        return False


def test_flower_refuses_without_auth_and_replays_a_dead_letter_with_it(
    flower: str, start_worker: Callable[..., Proc]
) -> None:
    assert requests.get(f"{flower}/tasks", timeout=5).status_code == 401
    assert requests.get(f"{flower}/tasks", auth=("ops", "wrong"), timeout=5).status_code == 401
    assert requests.get(f"{flower}/tasks", auth=AUTH, timeout=5).status_code == 200
    start_worker()
    with session_scope() as session:
        hold = add_hold(session, datetime.now(UTC) - timedelta(seconds=5))
    letter_id = new_letter("holds.expire", {"hold_id": hold})
    body = {"kwargs": {"dead_letter_id": letter_id, "actor": "flower:ops", "reason": "from Flower"}}
    denied = requests.post(f"{flower}/api/task/send-task/dlq.replay", json=body, timeout=5)
    assert denied.status_code == 401 and letter(letter_id).status == "NEW"
    sent = requests.post(f"{flower}/api/task/send-task/dlq.replay", json=body, auth=AUTH, timeout=5)
    assert sent.status_code == 200, sent.text
    wait_until(lambda: letter(letter_id).status == "REPLAYED", timeout=30)
