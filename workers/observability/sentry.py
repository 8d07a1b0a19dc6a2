"""Sentry for the worker and beat processes: errors with their task's context, beat schedules as
cron monitors, and nothing secret or personal in any event (see `workers.observability.scrub`).

Nothing happens unless SENTRY_DSN is set. `install()` connects the Celery signals that start
the SDK in the worker (before it forks its pool, and again in each pool process, which must not
share the parent's HTTP connections) and in beat.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import sentry_sdk
from celery import Celery, signals
from celery.schedules import crontab
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.integrations.logging import LoggingIntegration, ignore_logger
from sentry_sdk.scrubber import DEFAULT_DENYLIST, EventScrubber

from config import Settings, get_settings
from workers.observability.scrub import Scrubber, configured_secrets

log = logging.getLogger("backstop.sentry")

# Added to the SDK's own key denylist, which it applies before `before_send`.
EXTRA_DENYLIST = [
    "card",
    "card_number",
    "cvv",
    "cvc",
    "vpa",
    "upi",
    "phone",
    "mobile",
    "email",
    "recipient",
    "signature",
    "key_secret",
    "webhook_secret",
    "api_key",
    "args",
    "kwargs",
    "ip_address",
    "remote_addr",
    "x_forwarded_for",
    "x_real_ip",
]


def init(settings: Settings, *, app: Celery | None = None, **overrides: Any) -> bool:
    """Start the SDK when SENTRY_DSN is set; returns whether it did. `overrides` go to
    `sentry_sdk.init` as they are (a test's transport)."""
    if settings.SENTRY_DSN is None:
        return False
    dsn = settings.SENTRY_DSN.get_secret_value()
    scrubber = Scrubber(configured_secrets(settings))
    options: dict[str, Any] = {
        "dsn": dsn,
        "environment": settings.SENTRY_ENVIRONMENT,
        "traces_sample_rate": settings.SENTRY_TRACES_SAMPLE_RATE or None,
        "send_default_pii": False,
        "include_local_variables": False,
        "max_request_body_size": "never",
        "event_scrubber": EventScrubber(denylist=DEFAULT_DENYLIST + EXTRA_DENYLIST, recursive=True),
        "before_send": _before_send(scrubber),
        "before_send_transaction": scrubber,
        "before_breadcrumb": lambda crumb, hint: scrubber.clean(crumb),
        # Only the integrations chosen here: no automatic SQL or Redis breadcrumbs, whose
        # parameters would be one more place for personal data.
        "auto_enabling_integrations": False,
        "integrations": [
            CeleryIntegration(
                monitor_beat_tasks=True,
                exclude_beat_tasks=unmonitorable_entries(app),
            ),
            LoggingIntegration(level=logging.INFO, event_level=logging.ERROR),
        ],
        "in_app_include": ["workers", "tasks", "config"],
    }
    options.update(overrides)
    sentry_sdk.init(**options)
    # An alert is sent as its own Sentry message (workers.observability.alerts); its log line
    # would be a second event for the same thing.
    ignore_logger("backstop.alerts")
    return True


def unmonitorable_entries(app: Celery | None) -> list[str]:
    """Beat entries Sentry Crons cannot monitor: intervals that are not whole minutes (the
    5-second hold sweep). Schedule freshness covers them (ops.check_schedules, metrics)."""
    if app is None:
        return []
    excluded = []
    for name, entry in (app.conf.beat_schedule or {}).items():
        schedule = entry.get("schedule")
        if isinstance(schedule, crontab):
            continue
        seconds = schedule.total_seconds() if hasattr(schedule, "total_seconds") else schedule
        if not isinstance(seconds, int | float) or seconds % 60:
            excluded.append(f"^{re.escape(name)}$")
    return excluded


def _before_send(scrubber: Scrubber) -> Any:
    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any] | None:
        # A dead-lettered task's exception is reported by the Celery integration, with its
        # traceback; the log line that says so would be the same error twice.
        if event.get("logger") == "backstop.task" and _log_message(event) == "task.dead_lettered":
            return None
        return scrubber(event, hint)

    return before_send


def _log_message(event: dict[str, Any]) -> str | None:
    entry = event.get("logentry") or {}
    return entry.get("message") if isinstance(entry, dict) else None


def tag_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    """Put the running task's name, id, retries and queue on every event it raises."""
    if task is None or not sentry_sdk.get_client().is_active():
        return
    request = task.request
    scope = sentry_sdk.get_isolation_scope()
    scope.set_tag("task_name", task.name)
    scope.set_tag("task_id", task_id or request.id)
    scope.set_tag("task_retries", request.retries or 0)
    queue = (request.delivery_info or {}).get("routing_key")
    if queue:
        scope.set_tag("task_queue", queue)


def install(app: Celery) -> None:
    """Connect the signals that start Sentry in worker and beat processes."""

    def start(**_: Any) -> None:
        if init(get_settings(), app=app):
            log.info("sentry.started")

    signals.celeryd_init.connect(start, weak=False)
    signals.worker_process_init.connect(start, weak=False)
    signals.beat_init.connect(start, weak=False)
    signals.task_prerun.connect(tag_task)
