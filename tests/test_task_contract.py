"""The task contract for other services: the committed JSON Schemas match the models the
workers validate with, and `workers.client.enqueue` validates before it sends."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis as redis_lib
from click.testing import CliRunner

from workers.cli import main
from workers.client import PUBLIC_TASKS, enqueue, schema, schema_files
from workers.errors import PayloadError


def test_committed_schemas_are_the_workers_own() -> None:
    result = CliRunner().invoke(main, ["tasks", "schema", "--check"])
    assert result.exit_code == 0, result.output
    for path, text in schema_files().items():
        assert path.read_text() == text
    assert {path.name for path in schema_files()} == {
        f"{name}.v{version}.json" for name, version in PUBLIC_TASKS.items()
    }


def test_schemas_say_name_queue_and_fields() -> None:
    refund = schema("refunds.submit")
    assert (refund["x-task"], refund["x-queue"], refund["required"]) == (
        "refunds.submit",
        "critical",
        ["refund_id"],
    )
    assert refund["additionalProperties"] is False
    assert schema("notifications.send")["x-queue"] == "notifications"


def queued(redis: redis_lib.Redis, queue: str) -> list[tuple[str, dict[str, Any]]]:
    import base64

    out = []
    for raw in redis.lrange(queue, 0, -1):
        message = json.loads(raw)
        out.append((message["headers"]["task"], json.loads(base64.b64decode(message["body"]))[1]))
    return out


def test_enqueue_validates_then_sends_to_the_tasks_queue(redis: redis_lib.Redis) -> None:
    with pytest.raises(PayloadError, match="refund_id: Input should be a valid integer"):
        enqueue("refunds.submit", {"refund_id": "456"})
    assert queued(redis, "critical") == []
    task_id = enqueue("refunds.submit", {"refund_id": 456})
    assert task_id and queued(redis, "critical") == [("refunds.submit", {"refund_id": 456})]
