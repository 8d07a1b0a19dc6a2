"""A webhook's raw body and signature never leave a real worker in what it shows of a task: not
in its log (Celery's own failure line included), not in the events Flower reads, not in answers
to `celery inspect`, whatever repr the sender put in the message. Another service sending
`webhooks.process` by name with a plain `send_task` puts Celery's full repr of the arguments
there."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tests.conftest import wait_until
from tests.processes import Proc
from workers.celery_app import app
from workers.models import DeadLetter

pytestmark = pytest.mark.e2e

EMAIL = "leak.me.not@example.com"
SIGNATURE = "f00dfacecafe" * 5
BODY = json.dumps(
    {
        "event": "payment.captured",
        "payload": {"payment": {"entity": {"id": "pay_redaction01", "email": EMAIL}}},
    }
)
PAYLOAD = {"provider": "razorpay", "body": BODY, "signature": SIGNATURE}
SHOWN = f"'body': '<{len(BODY)} chars>', 'signature': '<{len(SIGNATURE)} chars>'"


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """Every task event the workers send while the test runs, as Flower would receive them."""
    seen: list[dict[str, Any]] = []
    ready = threading.Event()
    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": seen.append})

        def capture() -> None:
            receiver.consume_events = True
            ready.set()
            receiver.capture(limit=None, timeout=None, wakeup=False)

        thread = threading.Thread(target=capture, daemon=True)
        thread.start()
        ready.wait(5)
        yield seen
        receiver.should_stop = True
        thread.join(10)


def test_a_webhook_body_and_signature_are_shown_only_by_their_length(
    committed: Engine, start_worker: Callable[..., Proc], events: list[dict[str, Any]]
) -> None:
    worker = start_worker(RAZORPAY_WEBHOOK_SECRET="rzp_whsec_redaction")
    # One waits in the worker's schedule (`inspect scheduled` shows it) ...
    waiting = app.send_task("webhooks.process", kwargs=PAYLOAD, countdown=600)
    # ... and one runs now: its signature is wrong, a permanent failure Celery logs itself.
    failing = app.send_task("webhooks.process", kwargs=PAYLOAD)
    # A malformed one (positional arguments, a body that is no string) is shown no more.
    malformed = app.send_task(
        "webhooks.process",
        args=[BODY],
        kwargs={"provider": "razorpay", "body": {"raw": BODY}, "signature": [SIGNATURE]},
    )
    with Session(committed) as session:
        letters = wait_until(
            lambda: len(found := session.scalars(select(DeadLetter)).all()) == 2 and found,
            timeout=30,
        )
        errors = {letter.task_id: letter.error_type for letter in letters}
        assert errors == {failing.id: "WebhookSignatureError", malformed.id: "PayloadError"}

    scheduled = wait_until(lambda: app.control.inspect(timeout=2).scheduled(), timeout=20)
    requests = [entry["request"] for entries in scheduled.values() for entry in entries]
    assert [r["id"] for r in requests] == [waiting.id]
    assert SHOWN in requests[0]["kwargs"] and EMAIL not in json.dumps(scheduled)

    wait_until(lambda: any(e["type"] == "task-failed" for e in events), timeout=20)
    received = {e["uuid"]: e for e in events if e["type"] == "task-received"}
    assert set(received) == {waiting.id, failing.id, malformed.id}
    assert SHOWN in received[waiting.id]["kwargs"] and SHOWN in received[failing.id]["kwargs"]
    assert received[malformed.id]["args"] == "<1 positional arguments>"

    # Celery's own line for the failure is there, with the arguments as the worker shows them.
    log = worker.output()
    assert f"webhooks.process[{failing.id}] raised unexpected" in log
    assert f"<{len(BODY)} chars>" in log and f"<{len(SIGNATURE)} chars>" in log
    for shown in (json.dumps(events), log):
        assert EMAIL not in shown and SIGNATURE not in shown
