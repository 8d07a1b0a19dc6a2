"""Alerts for the on-call engineer: a log event, a Sentry event, and an ops notification row."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import sentry_sdk
from sqlalchemy.orm import Session

from workers.db.upsert import insert_ignore
from workers.messaging.outbox import OPS_RECIPIENT, request_delivery
from workers.models import Notification

log = logging.getLogger("backstop.alerts")


def raise_alert(
    session: Session, name: str, message: str, *, dedupe: str, now: datetime, **fields: Any
) -> bool:
    """Alert once per `dedupe` key: the ops notification row is unique on it, so a condition
    seen by every run of a job pages once. Returns True if this call raised it."""
    added = insert_ignore(
        session,
        Notification,
        {
            "channel": "email",
            "recipient": OPS_RECIPIENT,
            "template": f"alert.{name}",
            "data": {"message": message, **{k: str(v) for k, v in fields.items()}},
            "dedupe_key": f"alert:{dedupe}",
            "created_at": now,
            "updated_at": now,
        },
        conflict=["dedupe_key"],
        returning=Notification.id,
    )
    if added:
        # Delivered by email to NOTIFY_OPS_EMAIL once the caller commits; a failure there never
        # fails the caller.
        request_delivery(session, added, now)
        log.error("alert.%s", name, extra={"alert": message, **fields})
        with sentry_sdk.new_scope() as scope:
            scope.set_tag("alert", name)
            for key, value in fields.items():
                scope.set_extra(key, value)
            sentry_sdk.capture_message(f"{name}: {message}", level="error")
    return bool(added)
