"""Take docs/flower.png: Flower with backstop's tasks in it, shot with headless Chromium.

It starts what it needs on a private PostgreSQL and Redis (run it through tests/services.py):
the gateway simulator with the demo's payments and faults, a worker, Flower on a free local
port; then sends the demo's work — holds that expire, refunds that fail once and are retried,
a malformed task that is dead-lettered, a triage — waits for it, and screenshots Flower's task
list. Chromium is needed only here (`apt-get install chromium`), not by the test suite.

    make screenshot
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import processes  # noqa: E402
from tests.services import _free_port  # noqa: E402

OUT = ROOT / "docs" / "flower.png"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("screenshot: needs Chromium (apt-get install chromium)")


def main() -> int:
    browser = chromium()
    from workers.devtools.simulator import SimulatorServer

    with SimulatorServer() as server, tempfile.TemporaryDirectory() as folder:
        state = server.state
        env = {
            **os.environ,
            **server.gateway_env(),
            "GATEWAY_TIMEOUT_SECONDS": "2",
            "TASK_RETRY_BASE_SECONDS": "1",
        }
        os.environ.update(env)
        from workers.celery_app import app
        from workers.db import session_scope
        from workers.db.migrate import upgrade
        from workers.devtools.demo import seed_refunds, seed_simulator
        from workers.models import BookingHold

        upgrade(os.environ["DATABASE_URL"])
        seed_simulator(state)
        logs = Path(folder)
        worker = processes.worker(
            "shot", env, logs / "worker.log", queues="critical,default,notifications,batch"
        )
        port = _free_port()
        flower = processes.Proc(
            [
                *processes.CELERY,
                "flower",
                "--address=127.0.0.1",
                f"--port={port}",
                f"--db={logs / 'flower.db'}",
                "--persistent=True",
            ],
            {k: v for k, v in env.items() if k != "FLOWER_BASIC_AUTH"},
            logs / "flower.log",
        )
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(100):
                try:
                    requests.get(url, timeout=1)
                    break
                except requests.ConnectionError:
                    time.sleep(0.2)
            time.sleep(2)  # Flower subscribes to the worker's events
            now = datetime.now(UTC)
            with session_scope() as session:
                holds = []
                for index in range(6):
                    hold = BookingHold(
                        resource_id=f"court-{index % 3 + 1}",
                        user_id=f"user-{index}",
                        start_time=now + timedelta(days=1),
                        end_time=now + timedelta(days=1, hours=1),
                        expires_at=now - timedelta(seconds=1),
                    )
                    session.add(hold)
                    session.flush()
                    holds.append(hold.id)
                seed_refunds(session, now)  # sends refunds.submit after commit
            for hold in holds:
                app.send_task("holds.expire", kwargs={"hold_id": hold})
            app.send_task("holds.expire", kwargs={"hold_id": str(holds[0])})  # a caller's bug
            app.send_task("holds.sweep_expired")
            time.sleep(6)
            app.send_task("dlq.triage")
            app.send_task("ops.check_schedules")
            time.sleep(6)
            subprocess.run(
                [
                    browser,
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--hide-scrollbars",
                    "--window-size=1440,900",
                    "--virtual-time-budget=8000",
                    f"--screenshot={OUT}",
                    f"{url}/tasks",
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )
        finally:
            flower.stop()
            worker.stop()
    print(f"screenshot: {OUT} ({OUT.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
