"""Rows for tests, written with plain SQL-level inserts as another service would."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import insert
from sqlalchemy.orm import Session

from workers.models import BookingHold


def add_holds(session: Session, expires: list[datetime], status: str = "ACTIVE") -> list[int]:
    rows = [
        {
            "resource_id": f"r{i}",
            "user_id": f"u{i}",
            "start_time": at + timedelta(hours=1),
            "end_time": at + timedelta(hours=2),
            "expires_at": at,
            "status": status,
        }
        for i, at in enumerate(expires)
    ]
    return list(session.execute(insert(BookingHold).returning(BookingHold.id), rows).scalars())


def add_hold(session: Session, expires_at: datetime, status: str = "ACTIVE") -> int:
    return add_holds(session, [expires_at], status)[0]
