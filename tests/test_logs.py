"""Logs: readable text for `make run`, one JSON object per line in production, every line of a
task's run carrying its id and name — from a real worker."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine

from tests.conftest import wait_until
from tests.processes import Proc
from tests.workers.factories import add_hold
from workers.celery_app import app
from workers.db import session_scope
from workers.models import BookingHold

pytestmark = pytest.mark.e2e


def test_a_production_worker_logs_json_lines_bound_to_the_task(
    committed: Engine, start_worker: Callable[..., Proc]
) -> None:
    worker = start_worker(LOG_FORMAT="json")
    with session_scope() as session:
        hold = add_hold(session, datetime.now(UTC) - timedelta(seconds=1))
    result = app.send_task("holds.expire", kwargs={"hold_id": hold})
    wait_until(lambda: session_get_status(hold) == "EXPIRED")
    wait_until(lambda: '"hold.expired"' in worker.output())
    lines = [line for line in worker.output().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]  # every JSON-looking line parses
    ours = [r for r in records if r.get("event") == "hold.expired"]
    assert ours and ours[0]["task_id"] == result.id and ours[0]["task_name"] == "holds.expire"
    assert ours[0]["hold_id"] == hold and ours[0]["level"] == "INFO"


def session_get_status(hold: int) -> str:
    with session_scope() as session:
        return session.get(BookingHold, hold).status
