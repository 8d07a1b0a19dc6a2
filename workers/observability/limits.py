"""The limits in effect: every setting with where its value came from, and what the Celery app
will really do when a task fails, waits or runs long, read from the app and its broker
connection rather than from the settings. `backstop config show` prints them; a running
worker answers `celery -A workers inspect backstop_limits` with its own."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import Celery
from celery.worker.control import inspect_command
from dotenv import dotenv_values
from pydantic import SecretStr

from config import get_settings
from config.settings import Settings
from workers.base import BackstopTask, retry_cap
from workers.observability.scrub import FILTERED, Scrubber, configured_secrets

# The Celery options a task's fate depends on, and why each must hold.
TASK_OPTIONS = (
    "max_retries",
    "acks_late",
    "acks_on_failure_or_timeout",
    "reject_on_worker_lost",
    "soft_time_limit",
    "time_limit",
)


def settings_in_effect(settings: Settings, env_file: Path = Path(".env")) -> list[dict[str, Any]]:
    """Every setting: its value (secrets and URL passwords filtered), and its source —
    `environment`, `.env` or `default`."""
    from_file = dotenv_values(env_file) if env_file.is_file() else {}
    scrub = Scrubber(configured_secrets(settings))
    rows = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if name in os.environ:
            source = "environment"
        elif name in from_file:
            source = ".env"
        else:
            source = "default"
        if isinstance(value, SecretStr):
            shown: Any = FILTERED
        elif isinstance(value, str | Path):
            shown = scrub.text(str(value))
        else:
            shown = value
        rows.append({"name": name, "value": shown, "source": source})
    return rows


def task_limits(app: Celery) -> dict[str, dict[str, Any]]:
    """Each backstop task's queue and the options above, as the app resolves them: a task's
    own attribute, else the app's configuration."""
    conf = app.conf
    defaults = {
        "acks_late": conf.task_acks_late,
        "acks_on_failure_or_timeout": conf.task_acks_on_failure_or_timeout,
        "reject_on_worker_lost": conf.task_reject_on_worker_lost,
        "soft_time_limit": conf.task_soft_time_limit,
        "time_limit": conf.task_time_limit,
    }
    found = {}
    for name, task in sorted(app.tasks.items()):
        if not isinstance(task, BackstopTask):
            continue  # Celery's own (celery.*) and any a test adds
        options = {
            option: getattr(task, option, None)
            if getattr(task, option, None) is not None
            else defaults.get(option)
            for option in TASK_OPTIONS
        }
        options["queue"] = app.amqp.router.route({}, name)["queue"].name
        found[name] = options
    return found


def broker_limits(app: Celery, connection: Any | None = None) -> dict[str, Any]:
    """The options every task shares, and the broker's visibility timeout as its transport
    holds it (`connection`: the worker's own; else a new one, not connected)."""
    conf = app.conf
    transport = connection.default_channel if connection is not None else None
    visibility = getattr(transport, "visibility_timeout", None)
    if visibility is None:
        visibility = (conf.broker_transport_options or {}).get("visibility_timeout")
    return {
        "broker_visibility_timeout": visibility,
        "worker_prefetch_multiplier": conf.worker_prefetch_multiplier,
        "task_acks_late": conf.task_acks_late,
        "task_acks_on_failure_or_timeout": conf.task_acks_on_failure_or_timeout,
        "task_reject_on_worker_lost": conf.task_reject_on_worker_lost,
        "task_soft_time_limit": conf.task_soft_time_limit,
        "task_time_limit": conf.task_time_limit,
        "task_serializer": conf.task_serializer,
        "accept_content": list(conf.accept_content),
    }


def limits(app: Celery, settings: Settings, connection: Any | None = None) -> dict[str, Any]:
    """What `backstop config show` and `inspect backstop_limits` answer, besides settings."""
    return {
        "celery": broker_limits(app, connection),
        # Every countdown and ETA goes through `workers.messaging.enqueue.send` (which refuses a
        # longer one) or the base task's retry and deferral (capped at it).
        "longest_countdown_seconds": settings.max_countdown,
        "longest_retry_countdown_seconds": retry_cap(settings),
        "tasks": task_limits(app),
    }


def backstop_limits(state: Any) -> dict[str, Any]:
    """`celery -A workers inspect backstop_limits`: the limits this worker runs with."""
    return limits(state.app, get_settings(), state.consumer.connection)


def install() -> None:
    """Teach the worker the `backstop_limits` inspect command."""
    inspect_command(name="backstop_limits")(backstop_limits)
