"""The Celery application, configured from the settings: what sends tasks by name and what the
workers run. It imports nothing of backstop's but `config`, so any module may import it;
`workers.celery_app` wires the worker's processes around it (signals, Sentry, metrics)."""

from __future__ import annotations

import functools
from typing import Any

from celery import Celery

from config import get_settings
from config.celery import celery_config
from config.schedule import beat_schedule

# The task modules a worker imports, so that Celery registers every task by its name.
TASK_MODULES = [
    "tasks.holds",
    "tasks.refunds",
    "tasks.ops",
    "tasks.dlq",
    "tasks.notifications",
    "tasks.reconciliation",
    "tasks.payments",
    "tasks.webhooks",
]

settings = get_settings()
app = Celery("backstop", include=TASK_MODULES)
app.conf.update(celery_config(settings))
app.conf.beat_schedule = beat_schedule(settings)
app.set_default()


def registered_tasks() -> dict[str, Any]:
    """backstop's tasks, by name: every task the task modules declare (a worker has imported
    them already; another process, a CLI or a client, imports them on first use)."""
    import_task_modules()
    return {name: task for name, task in app.tasks.items() if not name.startswith("celery.")}


@functools.cache
def import_task_modules() -> None:
    app.loader.import_default_modules()
