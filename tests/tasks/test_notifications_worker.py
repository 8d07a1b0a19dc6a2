"""Notifications end to end: `notifications.send` sent by name to a real worker on Redis, email
to a real SMTP server in this process, SMS and push to the local provider over HTTP."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select

from tests.conftest import wait_until
from tests.processes import Proc
from workers.celery_app import app
from workers.db import session_scope
from workers.models import DeadLetter, JobRun, Notification
from workers.notify.delivery import send_notification
from workers.payloads import SendNotification

pytestmark = pytest.mark.e2e

MESSAGE = {"subject": "Court 3", "body": "See you at 18:00"}


def worker_env(smtp: Any, sandbox_server: Any, **extra: str) -> dict[str, str]:
    return {
        **smtp.env(),
        "SMS_PROVIDER_URL": sandbox_server.url,
        "SMS_PROVIDER_API_KEY": sandbox_server.state.api_key,
        "PUSH_PROVIDER_URL": sandbox_server.url,
        "PUSH_PROVIDER_API_KEY": sandbox_server.state.api_key,
        "NOTIFY_EMAIL_FROM": "bookings@example.com",
        "NOTIFY_TIMEOUT_SECONDS": "2",
        **extra,
    }


def statuses() -> dict[int, str]:
    with session_scope() as session:
        return dict(session.execute(select(Notification.id, Notification.status)).all())


def letters() -> list[DeadLetter]:
    with session_scope() as session:
        return list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))


def send(channel: str, recipient: str, **extra: Any) -> None:
    kwargs = {"channel": channel, "recipient": recipient, "template": "message", "data": MESSAGE}
    app.send_task("notifications.send", kwargs={**kwargs, **extra})


def test_notifications_sent_by_name_are_delivered_once_on_every_channel(
    committed: Engine,
    start_worker: Callable[..., Proc],
    smtp: Any,
    sandbox_server: Any,
    sandbox: Any,
) -> None:
    start_worker(**worker_env(smtp, sandbox_server))
    send("email", "ana@example.com", dedupe_key="booking-1-confirmed")
    send("email", "ana@example.com", dedupe_key="booking-1-confirmed")
    send("sms", "+14155550123")
    send("push", "device-token-0001")
    wait_until(lambda: list(statuses().values()) == ["SENT"] * 3, timeout=30)
    [mail] = smtp.messages
    assert mail["To"] == "ana@example.com" and mail["Subject"] == "Court 3"
    assert sandbox.stats()["requests"] == {"sms": 1, "push": 1}


def test_a_provider_down_for_every_attempt_ends_dead_and_a_replay_delivers_it_once(
    committed: Engine,
    start_worker: Callable[..., Proc],
    smtp: Any,
    sandbox_server: Any,
    sandbox: Any,
) -> None:
    worker = start_worker(
        **worker_env(smtp, sandbox_server, NOTIFY_BACKOFF_SECONDS="0.2", NOTIFY_MAX_ATTEMPTS="3")
    )
    sandbox.add_fault("push", "503")
    send("push", "device-token-0001")
    wait_until(lambda: list(statuses().values()) == ["DEAD"], timeout=30)
    [letter] = wait_until(letters)
    [notification] = statuses()
    assert (letter.task_name, letter.payload, letter.classification, letter.attempts) == (
        "notifications.deliver",
        {"notification_id": notification},
        "TRANSIENT",
        3,
    )
    assert "push provider HTTP 503" in letter.error_message
    assert sandbox.stats()["requests"] == {"push": 3}
    assert worker.output().count("notification.retry") == 2

    # The provider recovers; the operator's `backstop dlq replay` (its precheck revives the
    # DEAD notification, then its task is sent by name) delivers it exactly once.
    sandbox.clear_faults()
    replayed = backstop_cli("dlq", "replay", str(letter.id), "--reason", "provider is back")
    assert replayed.returncode == 0 and f"{letter.id}  replayed" in replayed.stdout, replayed
    wait_until(lambda: list(statuses().values()) == ["SENT"], timeout=30)
    wait_until(lambda: dead_letter_status(letter.id) == "REPLAYED", timeout=30)
    again = backstop_cli("dlq", "replay", str(letter.id), "--json")
    assert '"outcome": "skipped"' in again.stdout  # closed: nothing is sent again
    app.send_task(letter.task_name, kwargs=letter.payload)  # sent twice by mistake
    wait_until(lambda: "'already_sent'" in worker.output())
    assert len(sandbox.messages("push")) == 1
    assert sandbox.stats()["requests"] == {"push": 4}


def backstop_cli(*args: str) -> Any:
    import subprocess
    import sys

    from tests.conftest import service_env

    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env=service_env(BACKSTOP_ACTOR="ops:alice"),
        capture_output=True,
        text=True,
        timeout=60,
    )


def dead_letter_status(letter_id: int) -> str:
    from workers.models import DeadLetter

    with session_scope() as session:
        return session.get(DeadLetter, letter_id).status


def test_the_outbox_sweep_delivers_what_the_broker_lost(
    committed: Engine,
    start_worker: Callable[..., Proc],
    smtp: Any,
    sandbox_server: Any,
    sandbox: Any,
    redis: Any,
) -> None:
    written = datetime.now(UTC) - timedelta(minutes=10)
    with session_scope() as session:
        for i in range(20):
            payload = SendNotification(
                channel="sms", recipient=f"+1415555{i:04d}", template="message", data=MESSAGE
            )
            send_notification(session, payload, written)
    assert redis.llen("notifications") == 1  # the delivery pump they asked for
    redis.flushdb()  # the broker restarted without its messages
    start_worker(**worker_env(smtp, sandbox_server, NOTIFY_OUTBOX_AFTER_SECONDS="60"))
    app.send_task("notifications.sweep_outbox")
    wait_until(lambda: list(statuses().values()) == ["SENT"] * 20, timeout=30)
    assert sandbox.stats()["requests"] == {"sms": 20} and len(sandbox.messages()) == 20
    with session_scope() as session:
        run = session.scalar(select(JobRun).where(JobRun.job_name == "notifications.sweep_outbox"))
    assert run.outcome == "OK" and run.counts == {"enqueued": 20, "batches": 1}


BAD_PAYLOADS: list[tuple[dict[str, Any], str]] = [
    ({}, "channel: Field required"),
    ({"channel": "fax", "recipient": "x", "template": "message", "data": MESSAGE}, "channel: "),
    ({"channel": "email", "recipient": "not-an-address", "template": "message"}, "recipient: "),
    ({"channel": "sms", "recipient": "0800 FLOWERS", "template": "message"}, "recipient: "),
    ({"channel": "push", "recipient": "short", "template": "message"}, "recipient: "),
    ({"channel": "sms", "recipient": "+14155550123", "template": "nope"}, "template: "),
    ({"channel": "sms", "recipient": "+14155550123", "template": "message"}, "data: "),
    (
        {"channel": "sms", "recipient": "+14155550123", "template": "message", "data": []},
        "data: Input should be a valid dictionary",
    ),
    (
        {"channel": "sms", "recipient": 14155550123, "template": "message", "data": MESSAGE},
        "recipient: Input should be a valid string",
    ),
    (
        {
            "channel": "sms",
            "recipient": "+14155550123",
            "template": "message",
            "data": MESSAGE,
            "dedupe_key": "",
        },
        "dedupe_key: ",
    ),
    (
        {
            "channel": "sms",
            "recipient": "+14155550123",
            "template": "message",
            "data": MESSAGE,
            "priority": "high",
        },
        "priority: Extra inputs are not permitted",
    ),
]


def test_bad_payloads_through_a_real_worker_are_dead_letters_naming_the_field(
    committed: Engine,
    start_worker: Callable[..., Proc],
    smtp: Any,
    sandbox_server: Any,
    sandbox: Any,
) -> None:
    worker = start_worker(**worker_env(smtp, sandbox_server))
    for kwargs, _ in BAD_PAYLOADS:
        app.send_task("notifications.send", kwargs=kwargs)
    app.send_task("notifications.send", args=["email", "ana@example.com"])
    app.send_task("notifications.deliver", kwargs={"notification_id": "7"})
    wait_until(lambda: len(letters()) == len(BAD_PAYLOADS) + 2, timeout=30)
    found = {json.dumps(letter.payload, sort_keys=True): letter for letter in letters()}
    for kwargs, message in BAD_PAYLOADS:
        letter = found[json.dumps(kwargs, sort_keys=True)]
        assert message in letter.error_message, (kwargs, letter.error_message)
        assert (letter.classification, letter.error_type) == ("PERMANENT", "PayloadError")
    assert "notification_id: Input should be a valid integer" in (
        found[json.dumps({"notification_id": "7"})].error_message
    )
    # The worker is alive and still delivers.
    send("sms", "+14155550123")
    wait_until(lambda: list(statuses().values()) == ["SENT"], timeout=30)
    assert worker.popen.poll() is None
