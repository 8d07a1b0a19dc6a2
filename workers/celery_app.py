"""The Celery app. It imports `tasks/` so that Celery registers every task by its name."""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from config import get_settings
from config.celery import celery_config
from config.schedule import beat_schedule
from workers import limits, logs, metrics, sentry
from workers.db import dispose_engine

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
sentry.install(app)
metrics.install()
limits.install()


@signals.setup_logging.connect
def _setup_logging(loglevel: int | str | None = None, **_: Any) -> None:
    logs.configure(get_settings(), loglevel)


@signals.worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # A forked pool child must not reuse its parent's database connections.
    dispose_engine()


@signals.task_prerun.connect
def _bind_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    logs.bind_task(task_id, getattr(task, "name", None))


@signals.task_postrun.connect
def _clear_task(**_: Any) -> None:
    logs.clear_task()
