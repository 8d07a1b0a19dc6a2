"""Booking-hold expiry: one hold on request, and every due hold by a set-based sweep.

A confirmation by another service (`UPDATE booking_holds SET status='CONFIRMED' WHERE id=...
AND status='ACTIVE'`) may race either path at any moment. Both paths change a hold only by a
compare-and-set on `status = 'ACTIVE' AND expires_at <= now`, so exactly one side wins.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from workers.db import InvalidTransition, Steps, claim, transition
from workers.db.transitions import NOW, BatchTransition
from workers.db.upsert import insert_ignore
from workers.errors import NotFound
from workers.messaging.enqueue import enqueue_after_commit
from workers.messaging.outbox import request_delivery
from workers.models import BookingHold, Notification

Result = Literal["expired", "already_final", "not_due", "lost_race"]


@dataclass(frozen=True)
class ExpireOutcome:
    hold_id: int
    result: Result
    status: str
    expires_at: datetime


def expire_hold(
    session: Session, hold_id: int, now: datetime, *, actor: str = "holds.expire"
) -> ExpireOutcome:
    """Expire one hold if it is ACTIVE and due; anything else returns early, not an error."""
    row = session.execute(
        select(BookingHold.status, BookingHold.expires_at).where(BookingHold.id == hold_id)
    ).one_or_none()
    if row is None:
        raise NotFound(f"booking_holds {hold_id} does not exist")
    if row.status != "ACTIVE":
        return ExpireOutcome(hold_id, "already_final", row.status, row.expires_at)
    if row.expires_at > now:
        return ExpireOutcome(hold_id, "not_due", row.status, row.expires_at)
    try:
        change = transition(
            session,
            "booking_holds",
            hold_id,
            "EXPIRED",
            actor=actor,
            reason="hold expired",
            now=now,
            values={"released_at": now},
            guard=BookingHold.expires_at <= now,
        )
    except InvalidTransition as lost:  # confirmed or released between our read and write
        return ExpireOutcome(hold_id, "lost_race", lost.current, row.expires_at)
    if not change.changed:
        result: Result = "already_final" if change.from_status == "EXPIRED" else "not_due"
        return ExpireOutcome(hold_id, result, change.from_status, row.expires_at)
    enqueue_after_commit(session, "holds.expired", {"hold_ids": [hold_id]})
    return ExpireOutcome(hold_id, "expired", "EXPIRED", row.expires_at)


@dataclass
class SweepResult:
    expired: int = 0
    batches: int = 0


def sweep_expired_holds(
    steps: Steps,
    clock: Callable[[], datetime],
    *,
    batch_size: int,
    time_budget: float,
    actor: str = "holds.sweep_expired",
) -> SweepResult:
    """Expire every due ACTIVE hold, one statement and one commit per batch.

    Each batch claims up to `batch_size` due holds with SKIP LOCKED, so sweeps running at once
    split the backlog, and a hold a confirmer has locked is left for a later pass. The sweep
    stops when a batch comes back short or after `time_budget` seconds; the next beat goes on.
    """
    result = SweepResult()
    expire_due = _expire_due_holds(batch_size, actor)
    deadline = time.monotonic() + time_budget
    while True:
        with steps.step("batch") as session:
            ids = expire_due(session, clock())
            if ids:
                enqueue_after_commit(session, "holds.expired", {"hold_ids": ids})
        result.expired += len(ids)
        result.batches += 1
        if len(ids) < batch_size or time.monotonic() >= deadline:
            return result


@functools.cache
def _expire_due_holds(batch_size: int, actor: str) -> BatchTransition:
    due = claim(
        select(BookingHold.id)
        .where(BookingHold.status == "ACTIVE", BookingHold.expires_at <= NOW)
        .order_by(BookingHold.expires_at),
        batch_size,
    )
    return BatchTransition(
        "booking_holds",
        due,
        "ACTIVE",
        "EXPIRED",
        actor=actor,
        reason="hold expired (sweep)",
        values={"released_at": NOW},
        guard=BookingHold.expires_at <= NOW,
    )


def notify_expired(session: Session, hold_ids: list[int], now: datetime | None = None) -> int:
    """The follow-up of an expiry: one waitlist notification row per expired hold, written
    once however often the follow-up runs (the dedupe key is the hold's), delivered after
    commit when `now` is given. Returns rows added."""
    holds = session.execute(
        select(
            BookingHold.id,
            BookingHold.user_id,
            BookingHold.resource_id,
            BookingHold.start_time,
            BookingHold.end_time,
        ).where(BookingHold.id.in_(hold_ids), BookingHold.status == "EXPIRED")
    ).all()
    if not holds:
        return 0
    rows = [
        {
            "channel": "push",
            "recipient": f"user:{hold.user_id}",
            "template": "hold_expired",
            "data": {
                "hold_id": hold.id,
                "resource_id": hold.resource_id,
                "start_time": hold.start_time.isoformat(),
                "end_time": hold.end_time.isoformat(),
            },
            "dedupe_key": f"hold-expired:{hold.id}",
        }
        for hold in holds
    ]
    added = insert_ignore(
        session, Notification, rows, conflict=["dedupe_key"], returning=Notification.id
    )
    if now is not None:
        request_delivery(session, added, now)
    return len(added)
