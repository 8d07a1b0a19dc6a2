"""Another service in another language: tasks enqueued from Node.js with the `celery-node` npm
package into the real Redis broker are done by the real worker; a malformed one lands in
`dead_letters` with a message naming the field."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from tests.conftest import BROKER_URL, wait_until
from tests.processes import Proc
from tests.workers.factories import add_hold
from workers.db import session_scope
from workers.models import BookingHold, DeadLetter

pytestmark = pytest.mark.e2e
NODE = Path(__file__).resolve().parent.parent / "node"


def enqueue(task: str, queue: str, kwargs: dict[str, Any]) -> str:
    if shutil.which("node") is None or not (NODE / "node_modules" / "celery-node").is_dir():
        pytest.fail("node and tests/node/node_modules are needed: run `make node-deps`")
    done = subprocess.run(
        ["node", str(NODE / "enqueue.js"), BROKER_URL, task, queue, json.dumps(kwargs)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def hold_status(hold: int) -> str:
    with session_scope() as session:
        return session.get(BookingHold, hold).status


def letters() -> list[DeadLetter]:
    """The expiry's dead letters (the expired hold's waitlist push has none to go to here, and
    may leave its own)."""
    with session_scope() as session:
        found = list(
            session.scalars(select(DeadLetter).where(DeadLetter.task_name == "holds.expire"))
        )
        session.expunge_all()
        return found


def test_holds_expire_from_node_is_done_and_a_malformed_one_is_dead_lettered(
    committed: Engine, start_worker: Callable[..., Proc]
) -> None:
    start_worker()
    with session_scope() as session:
        hold = add_hold(session, datetime.now(UTC) - timedelta(seconds=1))
    enqueue("holds.expire", "critical", {"hold_id": hold})
    wait_until(lambda: hold_status(hold) == "EXPIRED")
    task_id = enqueue("holds.expire", "critical", {"hold_id": str(hold)})
    [letter] = wait_until(letters)  # type: ignore[misc]
    assert (letter.task_name, letter.task_id, letter.error_type) == (
        "holds.expire",
        task_id,
        "PayloadError",
    )
    assert letter.error_message.startswith("invalid payload: hold_id: Input should be a valid")
    assert letter.payload == {"hold_id": str(hold)}


def test_notifications_send_from_node_is_persisted_once(
    committed: Engine, start_worker: Callable[..., Proc]
) -> None:
    from workers.models import Notification

    start_worker()
    payload = {
        "channel": "email",
        "recipient": "guest@example.com",
        "template": "booking_confirmed",
        "data": {"resource_id": "court-1", "start_time": "2026-12-01 10:00"},
        "dedupe_key": "node-booking-9",
    }
    enqueue("notifications.send", "notifications", payload)
    enqueue("notifications.send", "notifications", payload)  # a retry on the sender's side

    def rows() -> list[tuple[str, str, str]]:
        with session_scope() as session:
            return list(
                session.execute(
                    select(Notification.channel, Notification.recipient, Notification.dedupe_key)
                ).all()
            )

    wait_until(rows)
    wait_until(
        lambda: "node-booking-9" in str(rows()) and len(letters_of("notifications.send")) == 0
    )
    assert rows() == [("email", "guest@example.com", "node-booking-9")]
    bad = dict(payload, channel="pigeon", dedupe_key="node-bad")
    enqueue("notifications.send", "notifications", bad)
    [letter] = wait_until(lambda: letters_of("notifications.send"))  # type: ignore[misc]
    assert letter.error_type == "PayloadError" and "channel" in letter.error_message


def letters_of(task: str) -> list[DeadLetter]:
    with session_scope() as session:
        found = list(session.scalars(select(DeadLetter).where(DeadLetter.task_name == task)))
        session.expunge_all()
        return found
