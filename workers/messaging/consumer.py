"""The worker's consumer: Celery's, with two places where it would lose messages closed.

- A message no task can run — a task name no worker knows, a body it may not or cannot
  decode — becomes a dead letter. Celery logs such a message and acks it; the contract says no
  payload, valid or not, is lost.
- When the broker connection is lost, the messages this worker had taken but not started
  (reserved, or waiting for their countdown) are put back on their queues as soon as it has
  connected again (so are the `notifications.send` messages waiting for a batch, forgotten by
  workers/messaging/batching.py). Celery drops its copies of them expecting the broker to
  deliver them again; Redis would, but only after the visibility timeout (2 hours), because the
  restore kombu tries while closing the dead connection cannot reach a Redis that is down.
  The tasks still running are left to finish; an ack Redis could not take is made once
  connected again.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.state import active_requests

from workers.base import utcnow
from workers.db import session_scope
from workers.dead_letters import record_dead_letter
from workers.errors import Classification, UndecodableMessage, UnknownTask, one_line
from workers.messaging import batching, redis_transport

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


def unacked(connection: Any) -> dict[str, str | None]:
    """The messages the connection's task channel holds unacked: delivery tag -> task id.
    Closing the channel must not put them back: kombu would restore every one, running tasks
    too, whenever Redis answers at that moment (a dropped connection, Redis still up). Which
    to put back is decided once connected again, when the pool has settled what it runs."""
    channel = getattr(connection, "_default_channel", None)  # never opens a new one
    qos = getattr(channel, "_qos", None)
    delivered = getattr(qos, "_delivered", None)
    if not delivered:
        return {}
    qos.restore_at_shutdown = False
    acked = getattr(qos, "_dirty", set())
    return {
        tag: (message.headers or {}).get("id")
        for tag, message in list(delivered.items())
        if tag not in acked
    }


def running_ids(pool: Any) -> set[str]:
    """The tasks this worker runs and will ack itself: started, already written to a pool
    process, or in a batch one runs (it runs them whatever became of the connection that
    brought them)."""
    ids = {request.id for request in tuple(active_requests)}
    jobs = getattr(getattr(pool, "_pool", None), "_cache", None) or {}
    ids.update(getattr(job, "correlation_id", None) for job in tuple(jobs.values()))
    ids.update(batching.running_ids())
    return {task_id for task_id in ids if task_id}


def put_back(connection: Any, tags: list[str]) -> None:
    """Move each message from the unacked hash back to its queue, first in line; one already
    acked (or restored by another worker) is no longer there and is skipped."""
    qos = connection.default_channel.qos
    restored = 0
    for tag in tags:
        try:
            qos.restore_by_tag(tag)
            restored += 1
        except Exception as error:
            log.error("broker.restore_failed", extra={"tag": tag, "error": one_line(error)})
    log.warning("broker.messages_put_back", extra={"count": restored})


class Consumer(CeleryConsumer):  # type: ignore[misc]
    _orphans: dict[str, str | None] = {}

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        self._orphans = {**self._orphans, **unacked(self.connection)}
        batching.forget_waiting()  # their messages are put back once connected again
        super().on_connection_error_after_connected(exc)

    def connect(self) -> Any:
        connection = super().connect()
        channel = connection.default_channel
        if redis_transport.UNFINISHED_ACKS:
            count = redis_transport.finish_acks(channel)
            log.warning("broker.acks_finished", extra={"count": count})
        orphans, self._orphans = self._orphans, {}
        running = running_ids(self.pool)
        waiting = [tag for tag, task_id in orphans.items() if task_id not in running]
        if waiting:
            put_back(connection, waiting)
        if redis_transport.STRANDED:
            count = redis_transport.put_back_stranded(channel)
            log.warning("broker.stranded_put_back", extra={"count": count})
        return connection

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
