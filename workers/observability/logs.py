"""Structured logs: dotted event names with key=value fields, bound to the running task.

`task_prerun` binds the task id and name to a context variable and `task_postrun` clears it;
a filter copies them onto every record, whichever logger wrote it.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from typing import Any

from pythonjsonlogger import json as jsonlogger

from config import Settings

_task: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "backstop_task", default=None
)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is a field.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "task_id", "task_name"}


def bind_task(task_id: str | None, task_name: str | None) -> None:
    _task.set((task_id or "-", task_name or "-"))


def clear_task() -> None:
    _task.set(None)


class TaskContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        bound = _task.get()
        record.task_id, record.task_name = bound or ("-", "-")
        return True


class KeyValueFormatter(logging.Formatter):
    """`time level logger [task_name task_id] event key=value ...`, one line per record."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)-7s %(name)s [%(task_name)s %(task_id)s] %(message)s"
        )

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        if fields:
            line += " " + " ".join(f"{k}={_show(v)}" for k, v in sorted(fields.items()))
        return line


def _show(value: Any) -> str:
    text = str(value)
    return repr(text) if (" " in text or not text) else text


class JsonFormatter(jsonlogger.JsonFormatter):  # type: ignore[misc]
    """One JSON object per line, for a log pipeline: the record's time, level, logger, event,
    task id and name, and every `extra=` field as its own key."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(task_id)s %(task_name)s",
            rename_fields={
                "asctime": "time",
                "levelname": "level",
                "name": "logger",
                "message": "event",
            },
            timestamp=False,
        )


def configure(settings: Settings, default_level: int | str | None = None) -> None:
    """Install backstop's handler on the root logger (Celery's own setup is switched off), in
    LOG_FORMAT: `text` (readable, `make run`) or `json` (production). LOG_LEVEL, when set, wins
    over `default_level` (a command line's --loglevel); INFO without either."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TaskContextFilter())
    handler.setFormatter(JsonFormatter() if settings.LOG_FORMAT == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.LOG_LEVEL or default_level or "INFO")
    # celery.worker.strategy logs every message body at INFO; task start and end are enough.
    for noisy in ("sqlalchemy.engine", "amqp", "kombu", "celery.worker.strategy", "stripe"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "No hostname was supplied" for every connection to the embedded filesystem:// broker.
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)
