"""Fuzzed `notifications.send` payloads (hypothesis) through the task's own validation and the
base task's error path, in this process for volume: nothing crashes, every invalid payload
becomes exactly one PERMANENT dead letter whose message names the field, every valid one a
notification. (A smaller batch goes through a real worker in test_notifications_worker.py.)"""

from __future__ import annotations

import functools
import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select

from tasks.notifications import send
from workers.db import session_scope
from workers.models import DeadLetter, Notification
from workers.templates import TEMPLATES

FIELDS = ("channel", "recipient", "template", "data", "dedupe_key")
RECIPIENTS = {"email": "ana@example.com", "sms": "+14155550123", "push": "user:42"}

# NaN, infinities and NUL characters included: Python's JSON carries them, Postgres refuses them.
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
not_a_string = json_values.filter(lambda v: not isinstance(v, str))
# Text Postgres can keep (no NUL, no unpaired surrogate), for the parts of a valid payload.
text = functools.partial(
    st.text, alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
)
bad_recipient = {
    "email": st.text(max_size=40).filter(lambda s: "@" not in s),
    "sms": st.text(alphabet="abcxyz -()", max_size=20),
    "push": st.text(alphabet="abcdef0123", max_size=7),
}


@st.composite
def valid_payloads(draw: st.DrawFn) -> dict[str, Any]:
    channel = draw(st.sampled_from(sorted(RECIPIENTS)))
    payload: dict[str, Any] = {
        "channel": channel,
        "recipient": RECIPIENTS[channel],
        "template": "message",
        "data": {"subject": draw(text(max_size=20)), "body": draw(text(max_size=40))},
    }
    if draw(st.booleans()):
        payload["dedupe_key"] = draw(st.from_regex(r"[a-z0-9:-]{1,40}", fullmatch=True))
    return payload


@st.composite
def invalid_payloads(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A valid payload broken in one field; returns it and the field the error must name."""
    payload = draw(valid_payloads())
    field = draw(st.sampled_from([*FIELDS, "extra", "missing"]))
    if field == "channel":
        payload["channel"] = draw(
            json_values.filter(lambda v: not (isinstance(v, str) and v in RECIPIENTS))
        )
    elif field == "recipient":
        payload["recipient"] = draw(not_a_string | bad_recipient[payload["channel"]])
    elif field == "template":
        payload["template"] = draw(
            not_a_string
            | st.text(max_size=30).filter(lambda s: s not in TEMPLATES and "alert." not in s)
        )
    elif field == "data":
        payload["data"] = draw(
            json_values.filter(lambda v: not isinstance(v, dict))
            | st.fixed_dictionaries({"subject": st.text(max_size=5)})
            | st.fixed_dictionaries({"subject": st.just("s"), "body": st.just("a\x00b")})
        )
    elif field == "dedupe_key":
        payload["dedupe_key"] = draw(
            not_a_string.filter(lambda v: v is not None)
            | st.just("")
            | st.text(min_size=257, max_size=300)
            | st.text(max_size=10).map(lambda s: s + "\n")
        )
    elif field == "extra":
        field = draw(
            st.from_regex(r"[a-z_]{1,12}", fullmatch=True).filter(lambda k: k not in FIELDS)
        )
        payload[field] = draw(json_values)
    else:
        field = draw(st.sampled_from(["channel", "recipient", "template"]))
        del payload[field]
    return payload, field


def run(payload: dict[str, Any]) -> tuple[Any, list[DeadLetter]]:
    """The task, as a worker runs it on a JSON message; returns its result and new letters."""
    kwargs = json.loads(json.dumps(payload))
    with session_scope() as session:
        before = session.scalar(select(func.max(DeadLetter.id))) or 0
    result = send.apply(kwargs=kwargs)
    with session_scope() as session:
        new = list(session.scalars(select(DeadLetter).where(DeadLetter.id > before)))
    return result, new


FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(case=invalid_payloads())
def test_an_invalid_payload_is_one_dead_letter_naming_its_field(
    committed: Engine, redis: Any, case: tuple[dict[str, Any], str]
) -> None:
    payload, field = case
    result, new = run(payload)
    assert result.failed()
    [letter] = new
    assert (letter.task_name, letter.classification, letter.error_type) == (
        "notifications.send",
        "PERMANENT",
        "PayloadError",
    )
    assert f"{field}:" in letter.error_message, (payload, letter.error_message)
    assert set(letter.payload) == set(payload)  # kept for a replay (jsonb may renumber)


@FUZZ
@given(payload=valid_payloads())
def test_a_valid_payload_is_one_notification(
    committed: Engine, redis: Any, payload: dict[str, Any]
) -> None:
    if "dedupe_key" in payload:  # unique per example: a key seen before returns that row
        payload["dedupe_key"] += f"-{uuid.uuid4().hex}"
    result, new = run(payload)
    assert new == [] and result.successful()
    with session_scope() as session:
        stored = session.get(Notification, result.result)
    assert (stored.channel, stored.recipient, stored.data) == (
        payload["channel"],
        payload["recipient"],
        payload["data"],
    )


@pytest.mark.parametrize("seed", range(1))
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=st.dictionaries(st.text(max_size=12), json_values, max_size=6))
def test_any_json_object_is_either_a_notification_or_a_dead_letter(
    committed: Engine, redis: Any, seed: int, payload: dict[str, Any]
) -> None:
    result, new = run(payload)
    if result.successful():
        assert new == []
    else:
        assert len(new) == 1 and new[0].error_message.startswith("invalid payload: ")
