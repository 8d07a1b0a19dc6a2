"""The demo workload `make run` seeds into an empty database, so a newcomer sees holds expire."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

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
