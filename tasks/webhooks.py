"""`webhooks.process {provider, body, signature}`: a gateway's webhook delivery, sent by the
webhook receiver as it arrived, on the `critical` queue."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select, tuple_
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


def events_not_recorded(
    session: Session, payloads: list[dict[str, Any]], actor: str
) -> list[str | None]:
    """A replayed delivery has nothing to do once its event is recorded: every letter's
    event looked up in one query (a payload that does not parse is let through, to fail again
    naming what is wrong)."""
    events: list[tuple[str, str] | None] = []
    for payload in payloads:
        provider, body = payload.get("provider"), payload.get("body")
        if provider not in ("razorpay", "stripe") or not isinstance(body, str):
            events.append(None)
            continue
        try:
            events.append((provider, parse(provider, body).event_id))
        except (MalformedWebhook, json.JSONDecodeError):
            events.append(None)
    wanted = sorted({event for event in events if event is not None})
    seen: set[tuple[str, str]] = set()
    if wanted:
        seen = {
            (row.provider, row.event_id)
            for row in session.execute(
                select(WebhookEvent.provider, WebhookEvent.event_id).where(
                    tuple_(WebhookEvent.provider, WebhookEvent.event_id).in_(wanted)
                )
            )
        }
    return ["the event is already recorded" if event in seen else None for event in events]


@task("webhooks.process", payload=ProcessWebhook, batch_precheck=events_not_recorded)
def process(ctx: TaskContext, payload: ProcessWebhook) -> str:
    return process_webhook(
        ctx.session,
        payload.provider,
        payload.body,
        payload.signature,
        webhook_secret(payload.provider),
        ctx.now,
    )
