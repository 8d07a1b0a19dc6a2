"""Logs: readable text for `make run`, one JSON object per line in production, every line of a
task's run carrying its id and name — from a real worker."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.conftest import service_env, wait_until
from tests.observability.metrics_helpers import exporter
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


def test_the_metrics_exporter_logs_in_the_format_the_workers_do(tmp_path: Path) -> None:
    proc, _ = exporter(service_env(LOG_FORMAT="json"), tmp_path / "exporter.log")
    try:
        lines = [line for line in proc.output().splitlines() if '"metrics.serving"' in line]
        assert lines and json.loads(lines[0])["level"] == "INFO"
    finally:
        assert proc.stop() == 0, proc.output()[-2000:]
