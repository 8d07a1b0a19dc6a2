"""The embedded default `make run` uses: SQLite and kombu's filesystem broker, no servers.

A real worker with beat and a real Flower run on it; holds expire by name and by the sweep,
and Flower, behind basic auth, sees the task events.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from tests.conftest import wait_until
from tests.processes import CELERY, ROOT, Proc
from tests.workers.factories import add_holds
from workers.models import BookingHold, JobRun

pytestmark = pytest.mark.e2e


def embedded_env(var_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL")}
    env.update(BACKSTOP_VAR_DIR=str(var_dir), PYTHONUNBUFFERED="1", **extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def backstop(env: dict[str, str], *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )


def flower_get(port: int, path: str, auth: str | None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""


def test_embedded_default_expires_holds_and_flower_sees_them(tmp_path: Path) -> None:
    port = free_port()
    env = embedded_env(
        tmp_path, HOLD_SWEEP_SECONDS="1", FLOWER_BASIC_AUTH="ops:s3cret", FLOWER_PORT=str(port)
    )
    backstop(env, "db", "upgrade")
    database = tmp_path / "backstop.sqlite"
    assert database.exists()
    engine = create_engine(f"sqlite:///{database}")
    now = datetime.now(UTC)
    with Session(engine) as session:
        by_task, *_ = add_holds(
            session,
            [now - timedelta(seconds=1), now + timedelta(seconds=1), now + timedelta(seconds=2)],
        )
        session.commit()

    procs = [
        Proc(
            [
                *CELERY,
                "worker",
                "--beat",
                f"--schedule={tmp_path / 'beat-schedule'}",
                "-c",
                "2",
                "-n",
                "embedded@%h",
                "--loglevel=INFO",
            ],
            env,
            tmp_path / "worker.log",
        ),
        Proc(
            [
                *CELERY,
                "flower",
                "--address=127.0.0.1",
                f"--port={port}",
                f"--db={tmp_path / 'flower.db'}",
            ],
            env,
            tmp_path / "flower.log",
        ),
    ]
    try:
        procs[0].wait_for("ready.")
        procs[1].wait_for("Visit me")
        subprocess.run(
            [
                sys.executable,
                "-c",
                "from workers.celery_app import app; "
                f"app.send_task('holds.expire', kwargs={{'hold_id': {by_task}}})",
            ],
            env=env,
            cwd=ROOT,
            check=True,
            timeout=60,
        )

        def statuses() -> dict[int, str]:
            with Session(engine) as session:
                return dict(session.execute(select(BookingHold.id, BookingHold.status)).all())

        wait_until(lambda: set(statuses().values()) == {"EXPIRED"}, timeout=60)

        # The sweep commits its expiries batch by batch and its heartbeat row after them.
        def heartbeat() -> JobRun | None:
            with Session(engine) as session:
                return session.scalar(
                    select(JobRun).where(JobRun.job_name == "holds.sweep_expired")
                )

        beats = wait_until(heartbeat, timeout=30)
        assert beats.runs >= 1  # type: ignore[attr-defined]

        assert flower_get(port, "/api/tasks", None)[0] == 401
        assert flower_get(port, "/api/tasks", "ops:wrong")[0] == 401

        def states_seen_by_flower() -> dict[str, set[str]]:
            status, body = flower_get(port, "/api/tasks", "ops:s3cret")
            assert status == 200
            states: dict[str, set[str]] = {}
            for task in json.loads(body).values():
                states.setdefault(task["name"], set()).add(task["state"])
            return states

        # Beat sends a sweep every second, so the newest one may still be running: what
        # counts is that Flower saw each task through to SUCCESS at least once.
        wait_until(
            lambda: (
                {"SUCCESS"} <= states_seen_by_flower().get("holds.expire", set())
                and {"SUCCESS"} <= states_seen_by_flower().get("holds.sweep_expired", set())
            ),
            timeout=30,
        )
    finally:
        for proc in procs:
            proc.stop()
    assert "Traceback" not in procs[0].output(), procs[0].output()[-3000:]


def test_prune_keeps_waiting_tasks_and_drops_stale_event_queues(tmp_path: Path) -> None:
    from workers.devtools.demo import prune_embedded_broker

    messages, control = tmp_path / "messages", tmp_path / "control"
    messages.mkdir()
    control.mkdir()
    (control / "celeryev.exchange").write_text("[]")
    kept = [messages / "1_a.critical.msg", messages / "2_b.batch.msg"]
    stale = [messages / "3_c.celeryev.5f9a-77.msg", messages / "4_d.reply.celery.pidbox.msg"]
    for path in kept + stale:
        path.write_text("{}")
    assert prune_embedded_broker(tmp_path) == 2
    assert not control.exists()
    assert sorted(messages.iterdir()) == sorted(kept)


def test_the_embedded_broker_never_shows_a_worker_a_half_written_message(tmp_path: Path) -> None:
    from kombu import Connection

    from config.celery import celery_config
    from config.settings import load_settings

    assert celery_config(load_settings(BROKER_URL="filesystem://"))["broker_transport"] == (
        "workers.messaging.embedded_broker:Transport"
    )
    folder = tmp_path / "messages"
    folder.mkdir()
    # Every folder named: kombu's default for the exchange table is `control` in the current
    # directory, which once left `control/default.exchange` in the checkout.
    options = {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "control_folder": str(tmp_path / "control"),
    }
    with Connection(
        "filesystem://",
        transport="workers.messaging.embedded_broker:Transport",
        transport_options=options,
    ) as connection:
        queue = connection.SimpleQueue("default")
        # What a writer leaves while it writes: never taken, whatever its state.
        (folder / "1_x.default.msg.part").write_bytes(b"")
        queue.put({"hold_id": 1})
        assert [path.suffix for path in folder.iterdir()].count(".msg") == 1
        assert queue.get(timeout=1).payload == {"hold_id": 1}
        assert [path.name for path in folder.iterdir()] == ["1_x.default.msg.part"]
        queue.close()
