"""Enqueue backstop tasks from Python, by name, validated before they are sent.

    from workers.client import enqueue
    enqueue("refunds.submit", {"refund_id": 456})   # -> the task id

The payload is checked against the same pydantic model the worker validates with, so a bad one
fails here, in the caller, with the one-line message naming the field, instead of becoming a dead
letter later. The queue comes from backstop's routes; nothing else needs configuring beyond
BROKER_URL. Services in other languages send the same JSON (see docs/tasks.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workers.application import app, registered_tasks
from workers.payloads import Payload, validate

# The tasks other services may enqueue (contract section 4), and their schema versions: a change
# that could break a sender (a new required field, a narrower type) gets a new version.
PUBLIC_TASKS: dict[str, int] = {
    "holds.expire": 1,
    "refunds.submit": 1,
    "notifications.send": 1,
    "webhooks.process": 1,
    "dlq.replay": 1,
}
SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "task-schemas"


class UnknownTask(ValueError):
    pass


def payload_model(task_name: str) -> type[Payload] | None:
    task = registered_tasks().get(task_name)
    if task is None:
        raise UnknownTask(f"no task named {task_name!r}; public tasks: {sorted(PUBLIC_TASKS)}")
    return getattr(task, "payload_model", None)


def queue_of(task_name: str) -> str:
    route = app.amqp.router.route({}, task_name)
    return str(route["queue"].name)


def enqueue(task_name: str, payload: dict[str, Any], **options: Any) -> str:
    """Validate `payload` for `task_name` and send it; returns the task id. `options` go to
    Celery's `send_task` (countdown, eta, ...)."""
    model = payload_model(task_name)
    if model is not None:
        validate(model, payload)  # raises PayloadError, one line naming the field
    elif payload:
        raise UnknownTask(f"{task_name} takes no payload")
    return str(app.send_task(task_name, kwargs=payload, **options).id)


def schema(task_name: str) -> dict[str, Any]:
    """The versioned JSON Schema of a public task's payload."""
    model = payload_model(task_name)
    if model is None:
        raise UnknownTask(f"{task_name} takes no payload")
    version = PUBLIC_TASKS[task_name]
    body = model.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://backstop.internal/task-schemas/{task_name}.v{version}.json",
        "title": task_name,
        "description": (
            f"kwargs of the Celery task {task_name!r} (protocol 2, JSON), "
            f"sent to the {queue_of(task_name)!r} queue"
        ),
        "x-task": task_name,
        "x-queue": queue_of(task_name),
        "x-version": version,
        **{key: value for key, value in body.items() if key != "title"},
    }


def schema_files() -> dict[Path, str]:
    """What `backstop tasks schema` writes: one file per public task and version."""
    return {
        SCHEMA_DIR / f"{name}.v{version}.json": json.dumps(schema(name), indent=2) + "\n"
        for name, version in sorted(PUBLIC_TASKS.items())
    }
