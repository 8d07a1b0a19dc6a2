"""The demo workload `make run` seeds into an empty database, so a newcomer sees holds expire."""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from config.celery import QUEUES
from workers.enqueue import enqueue_after_commit
from workers.models import BookingHold


def seed(session: Session, now: datetime, *, holds: int = 24) -> list[int]:
    """Holds expiring over the next minute: every other one also gets a `holds.expire` task as
    a booking service would send; the sweep finds the rest. A quarter are confirmed at once by
    "another service" and must never expire. Returns the new hold ids; seeds nothing if the
    database already has holds."""
    if session.scalar(select(func.count()).select_from(BookingHold)):
        return []
    rows = [
        {
            "resource_id": f"court-{index % 4 + 1}",
            "user_id": f"demo-user-{index}",
            "start_time": now + timedelta(days=1, hours=index),
            "end_time": now + timedelta(days=1, hours=index + 1),
            "expires_at": now + timedelta(seconds=10 + index * 2),
        }
        for index in range(holds)
    ]
    ids = list(session.execute(insert(BookingHold).returning(BookingHold.id), rows).scalars())
    confirmed = ids[3::4]
    session.execute(
        update(BookingHold)
        .where(BookingHold.id.in_(confirmed), BookingHold.status == "ACTIVE")
        .values(status="CONFIRMED", updated_at=now)
    )
    for index, hold_id in enumerate(ids):
        if index % 2 == 0 and hold_id not in confirmed:
            enqueue_after_commit(
                session,
                "holds.expire",
                {"hold_id": hold_id},
                countdown=(rows[index]["expires_at"] - now).total_seconds(),
            )
    return ids


def prune_embedded_broker(folder: Path) -> int:
    """Forget what an earlier `make run` left in the filesystem broker besides tasks.

    kombu's filesystem transport keeps fanout bindings in files, so the event queue of a Flower
    that has gone would go on receiving every task event, forever. With nothing running, drop
    all bindings (workers and producers declare theirs again) and every message not on one of
    the task queues. Tasks still waiting are kept. Returns the messages removed.
    """
    shutil.rmtree(folder / "control", ignore_errors=True)
    removed = 0
    for path in (folder / "messages").glob("*.msg"):
        queue = path.name.partition(".")[2].removesuffix(".msg")
        if queue not in QUEUES:
            path.unlink(missing_ok=True)
            removed += 1
    return removed
