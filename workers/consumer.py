"""The worker's consumer: Celery's, except that a message no task can run — a task name no
worker knows, a body it may not or cannot decode — becomes a dead letter instead of vanishing.
Celery logs such a message and acks it; the contract says no payload, valid or not, is lost."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from workers.base import utcnow
from workers.db import session_scope
from workers.dlq import record_dead_letter
from workers.errors import Classification, UndecodableMessage, UnknownTask, one_line

log = logging.getLogger("backstop.consumer")

RAW_LIMIT = 100_000  # characters of an undecodable body kept in its dead letter


def payload_of(message: Any) -> dict[str, Any]:
    """The message's keyword arguments when its body is JSON in Celery's protocol 2
    (`[args, kwargs, embed]`); else its raw body, as text or base64, never decoded further
    (a pickle is never unpickled)."""
    body = message.body
    raw = body if isinstance(body, bytes) else str(body).encode("utf-8", "surrogatepass")
    if message.content_type == "application/json":
        try:
            decoded = json.loads(raw)
        except ValueError:
            decoded = None
        if isinstance(decoded, list) and len(decoded) == 3 and isinstance(decoded[1], dict):
            args, kwargs = decoded[0], dict(decoded[1])
            if args:
                kwargs["__args__"] = args
            return kwargs
    try:
        text, encoding = raw.decode("utf-8"), "text"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(raw).decode("ascii"), "base64"
    return {
        "__raw_body__": text[:RAW_LIMIT],
        "__body_encoding__": encoding,
        "__content_type__": message.content_type,
    }


def keep(message: Any, error: Exception) -> None:
    """Write the dead letter of a message no task will run. If even that fails, Celery's own
    log line (which carries the body) is what remains."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    task_name = str(headers.get("task") or "<no task name>")[:200]
    try:
        with session_scope() as session:
            letter = record_dead_letter(
                session,
                task_name=task_name,
                task_id=str(headers["id"])[:200] if headers.get("id") else None,
                payload=payload_of(message),
                error=error,
                attempts=1,
                classification=Classification.PERMANENT,
                now=utcnow(),
            )
    except Exception as write_error:
        log.error("dead_letter.write_failed", extra={"error": one_line(write_error)})
        return
    log.error(
        "task.dead_lettered",
        extra={"dead_letter_id": letter, "task": task_name, "error": one_line(error)},
    )


class Consumer(CeleryConsumer):  # type: ignore[misc]
    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (message.headers or {}).get("task") if isinstance(message.headers, dict) else None
        keep(
            message,
            UnknownTask(
                f"no task is registered as {name!r}: a typo in the sender, or a worker older "
                "than the sender; correct the name and send it again"
            ),
        )
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        keep(message, UndecodableMessage(f"invalid task message: {one_line(exc)}"))
        super().on_invalid_task(body, message, exc)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        keep(message, UndecodableMessage(f"the body cannot be decoded: {one_line(exc)}"))
        super().on_decode_error(message, exc)
