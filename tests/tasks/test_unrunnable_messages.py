"""Messages no task can run reach a real worker: a task name no worker has, a pickle (which
the worker must refuse to deserialize), a body that is not valid JSON. Celery logs each and
acks it; backstop keeps each as a dead letter, and the worker goes on."""

from __future__ import annotations

import base64
import pickle
import uuid
from collections.abc import Callable

import pytest
from kombu import Connection, Exchange, Producer
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tests.conftest import BROKER_URL, wait_until
from tests.processes import Proc
from workers.celery_app import app
from workers.dlq.rules import match
from workers.models import DeadLetter

pytestmark = pytest.mark.e2e


def publish_raw(body: bytes, content_type: str, task_name: str = "holds.expire") -> str:
    """A message as a broken or hostile sender would publish it, straight to the queue."""
    task_id = str(uuid.uuid4())
    with Connection(BROKER_URL) as conn:
        Producer(conn).publish(
            body,
            exchange=Exchange("critical"),
            routing_key="critical",
            content_type=content_type,
            content_encoding="binary",
            headers={"task": task_name, "id": task_id, "lang": "py"},
            serializer=None,
        )
    return task_id


def test_messages_no_task_can_run_become_dead_letters_and_the_worker_goes_on(
    committed: Engine, start_worker: Callable[..., Proc]
) -> None:
    worker = start_worker()
    app.send_task("holds.expirre", kwargs={"hold_id": 5})
    hostile = pickle.dumps(((), {"hold_id": 1}, {}))
    pickled = publish_raw(hostile, "application/x-python-serialize")
    garbled = publish_raw(b'[[], {"hold_id": 2', "application/json")

    def letters() -> list[DeadLetter]:
        with Session(committed) as session:
            return list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))

    arrived = wait_until(lambda: len(letters()) == 3 and letters())
    found = {letter.task_id: letter for letter in arrived}
    [unknown] = [letter for letter in found.values() if letter.task_name == "holds.expirre"]
    assert (unknown.error_type, unknown.classification, unknown.payload) == (
        "UnknownTask",
        "PERMANENT",
        {"hold_id": 5},
    )
    assert "no task is registered as 'holds.expirre'" in unknown.error_message
    refused = found[pickled]
    assert (refused.task_name, refused.error_type) == ("holds.expire", "UndecodableMessage")
    assert "pickle" in refused.error_message
    assert refused.payload["__body_encoding__"] == "base64"
    assert base64.b64decode(refused.payload["__raw_body__"]) == hostile  # kept, never unpickled
    broken = found[garbled]
    assert broken.error_type == "UndecodableMessage" and "decoded" in broken.error_message
    assert broken.payload["__raw_body__"] == '[[], {"hold_id": 2'
    assert {match(letter).name for letter in found.values()} == {"permanent"}
    assert worker.popen.poll() is None
