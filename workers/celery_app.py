"""The worker's composition root: the Celery app (`workers.application`) with what its
processes need around it: logging, Sentry, metrics, the limits command, and a fresh database
engine in every forked child. `celery -A workers` loads it."""

from __future__ import annotations

from typing import Any

from celery import signals

from config import get_settings
from workers.application import TASK_MODULES, app
from workers.db import dispose_engine
from workers.observability import limits, logs, metrics, sentry

__all__ = ["TASK_MODULES", "app"]

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
