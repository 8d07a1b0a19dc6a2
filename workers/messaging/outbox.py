"""The notification outbox as every domain writes to it: a business operation that wrote
`notifications` rows in its own transaction (an alert, a hold's waitlist notice) asks for
their delivery once it commits, and a `notifications.deliver_due` pump is sent, debounced
through Redis. The delivery itself is `workers.notify`'s."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from config import get_settings
from workers.db import on_commit
from workers.errors import one_line
from workers.messaging.broker import broker_redis
from workers.messaging.enqueue import send
from workers.models import Notification

log = logging.getLogger("backstop.notify")

PUMP_KEY = "backstop:notify:pump"
# While a pump is queued, notifications written in this window ride on it.
PUMP_DEBOUNCE_MS = 2000
OPS_RECIPIENT = "ops"  # workers.observability.alerts writes ops alerts to this recipient


def kick_after_commit(session: Session) -> None:
    """Once the session commits, make sure a `notifications.deliver_due` pump is on its way.
    Sends are debounced through Redis: while one pump is queued and has not started, more
    notifications ride on it instead of each sending its own message. A pump deletes the key
    before its first claim, so a notification committed after that claim sends a new one."""
    on_commit(session, kick)


_redis_clients: dict[int, Any] = {}


def _pump_redis() -> Any | None:
    settings = get_settings()
    if not settings.broker_is_redis:
        return None  # the embedded broker: every kick sends its own pump
    pid = os.getpid()
    if pid not in _redis_clients:
        _redis_clients.clear()
        _redis_clients[pid] = broker_redis(settings, timeout=2)
    return _redis_clients[pid]


def kick() -> None:
    client = _pump_redis()
    claimed = False
    if client is not None:
        try:
            if not client.set(PUMP_KEY, "1", nx=True, px=PUMP_DEBOUNCE_MS):
                return
            claimed = True
        except Exception as exc:  # Redis unreachable: send the pump anyway
            log.warning("notification.kick_unchecked", extra={"error": one_line(exc)[:200]})
    try:
        send("notifications.deliver_due", {})
    except Exception:
        if claimed:  # no pump went out: the next kick must not ride on one
            with contextlib.suppress(Exception):
                client.delete(PUMP_KEY)  # type: ignore[union-attr]
        raise


def pump_started() -> None:
    """Called by a pump before its first claim: the next kick sends a new pump."""
    client = _pump_redis()
    if client is not None:
        try:
            client.delete(PUMP_KEY)
        except Exception as exc:  # its key expires by itself
            log.warning("notification.pump_key", extra={"error": one_line(exc)[:200]})


def request_delivery(session: Session, notification_ids: Sequence[int], now: datetime) -> None:
    """For a business operation that wrote notification rows in its own transaction (an
    alert, a hold's waitlist notice): send their deliveries once it commits. Nothing here can
    fail that transaction: a failed write is undone alone (savepoint) and logged, a failed send
    is logged after the commit, and the outbox sweep delivers the rows either way."""
    if not notification_ids:
        return
    ids = sorted(notification_ids)
    try:
        with session.begin_nested():
            session.execute(
                update(Notification).where(Notification.id.in_(ids)).values(enqueued_at=now)
            )
    except Exception as exc:
        log.error("notification.enqueue_failed", extra={"error": one_line(exc)[:300]})
        return
    kick_after_commit(session)
