"""`webhooks.process {provider, body, signature}`: a gateway's webhook delivery, sent by the
webhook receiver as it arrived, on the `critical` queue."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from config import get_settings
from workers.base import TaskContext, task
from workers.models import WebhookEvent
from workers.payloads import ProcessWebhook
from workers.webhooks.events import MalformedWebhook, parse, process_webhook


def webhook_secret(provider: str) -> str | None:
    settings = get_settings()
    secret = (
        settings.RAZORPAY_WEBHOOK_SECRET
        if provider == "razorpay"
        else settings.STRIPE_WEBHOOK_SECRET
    )
    return secret.get_secret_value() if secret else None


def event_not_recorded(session: Session, payload: dict[str, Any], actor: str) -> str | None:
    """A replayed delivery has nothing to do once its event is recorded."""
    provider, body = payload.get("provider"), payload.get("body")
    if provider not in ("razorpay", "stripe") or not isinstance(body, str):
        return None
    try:
        event = parse(provider, body)
    except (MalformedWebhook, json.JSONDecodeError):
        return None
    seen = session.execute(
        select(WebhookEvent.id).where(
            WebhookEvent.provider == provider, WebhookEvent.event_id == event.event_id
        )
    ).scalar_one_or_none()
    return "the event is already recorded" if seen is not None else None


@task("webhooks.process", payload=ProcessWebhook, precheck=event_not_recorded)
def process(ctx: TaskContext, payload: ProcessWebhook) -> str:
    return process_webhook(
        ctx.session,
        payload.provider,
        payload.body,
        payload.signature,
        webhook_secret(payload.provider),
        ctx.now,
    )
