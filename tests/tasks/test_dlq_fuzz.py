"""Fuzzed `dlq.replay` payloads: whatever arrives, the task never crashes the worker, never
loops, and every invalid payload lands in `dead_letters` with a message naming the field."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select

from tests.conftest import truncate, wait_until
from tests.processes import Proc
from workers.application import registered_tasks
from workers.celery_app import app
from workers.db import session_scope
from workers.dead_letters import storable
from workers.errors import PayloadError, one_line
from workers.models import DeadLetter
from workers.payloads import ReplayDeadLetter, validate

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=5,
)
FIELDS = st.sampled_from(["dead_letter_id", "actor", "reason", "dead_letter", "id", ""])
PAYLOADS = st.dictionaries(FIELDS | st.text(max_size=8), JSON, max_size=4) | st.fixed_dictionaries(
    {"dead_letter_id": JSON, "actor": JSON}
)


def same(stored: Any, sent: Any) -> bool:
    """Equal as JSON numbers compare: JSONB keeps a float's digits, which may read back as an
    int of the same value, rounded as the float is."""
    if isinstance(sent, float) or isinstance(stored, float):
        return isinstance(stored, int | float) and float(stored) == float(sent)
    if isinstance(sent, dict):
        return (
            isinstance(stored, dict)
            and stored.keys() == sent.keys()
            and all(same(stored[key], sent[key]) for key in sent)
        )
    if isinstance(sent, list):
        return (
            isinstance(stored, list)
            and len(stored) == len(sent)
            and all(same(a, b) for a, b in zip(stored, sent, strict=True))
        )
    return type(stored) is type(sent) and stored == sent


def letters() -> list[DeadLetter]:
    with session_scope() as session:
        found = list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))
        session.expunge_all()
        return found


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(payload=PAYLOADS)
def test_any_payload_ends_done_or_in_dead_letters_naming_the_field(
    committed: Engine, payload: dict[str, Any]
) -> None:
    truncate(committed)
    task = registered_tasks()["dlq.replay"]
    result = task.apply(kwargs=payload)
    try:
        validate(ReplayDeadLetter, payload)
        expected = None
    except PayloadError as exc:
        expected = storable(one_line(exc))
    found = letters()
    assert len(found) == 1  # valid or not, no dead letter id exists here: one letter, no loop
    [dead] = found
    assert dead.task_name == "dlq.replay" and dead.status == "NEW"
    assert same(dead.payload, storable(payload))  # kept, as Postgres can keep it
    if expected is not None:
        assert dead.error_type == "PayloadError" and dead.error_message == expected
        assert dead.classification == "PERMANENT"
        named = [field for field in ("dead_letter_id", "actor", "reason") if field in expected]
        assert named or "unexpected" in expected or "Extra inputs" in expected
    else:
        assert dead.error_type == "ReplayError" and "does not exist" in dead.error_message
    assert result.failed()


@pytest.mark.e2e
def test_a_worker_takes_a_burst_of_garbage_and_keeps_working(
    committed: Engine, start_worker: Callable[..., Proc]
) -> None:
    worker = start_worker()
    garbage: list[Any] = [
        {},
        {"dead_letter_id": "1", "actor": "x"},
        {"dead_letter_id": 1.5, "actor": "x"},
        {"dead_letter_id": -3, "actor": "x"},
        {"dead_letter_id": 2**70, "actor": "x"},
        {"dead_letter_id": True, "actor": "x"},
        {"dead_letter_id": None, "actor": None},
        {"dead_letter_id": 1, "actor": ""},
        {"dead_letter_id": 1, "actor": "x" * 500},
        {"dead_letter_id": 1, "actor": "x", "extra": {"nested": [1, 2]}},
        {"dead_letter_id": [1], "actor": ["x"]},
        {"dead_letter_id": {"$gt": 0}, "actor": "x"},
    ]
    for payload in garbage:
        app.send_task("dlq.replay", kwargs=payload)
    app.send_task("dlq.replay", args=[1, "positional"])
    wait_until(lambda: len(letters()) == len(garbage) + 1, timeout=60)
    found = letters()
    # Every one is invalid, the positional one too: each a permanent letter naming what is wrong.
    assert all(letter.error_type == "PayloadError" for letter in found)
    assert all(letter.error_message.startswith("invalid payload: ") for letter in found)
    assert worker.popen.poll() is None  # still running
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(DeadLetter)) == len(garbage) + 1
