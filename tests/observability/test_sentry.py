"""Sentry: errors carry their task's context, beat schedules are cron monitors, and no secret or
personal field leaves: events are captured by a local transport, and by a local HTTP endpoint
a real worker sends its envelopes to."""

from __future__ import annotations

import copy
import gzip
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
import sentry_sdk
from hypothesis import given, settings
from hypothesis import strategies as st
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport
from sqlalchemy import Engine, func, select

from config import get_settings
from config.settings import load_settings
from tests.conftest import wait_until
from tests.processes import Proc
from workers.db import session_scope
from workers.models import DeadLetter, JobRun
from workers.observability import sentry
from workers.observability.scrub import Scrubber, configured_secrets

SECRETS = {
    "RAZORPAY_KEY_ID": "rzp_test_Kq3Vb8LmZx2Nw7",
    "RAZORPAY_KEY_SECRET": "Zq7pLm2xVt9bWc4nHh5s",
    "RAZORPAY_WEBHOOK_SECRET": "hooky-Rt6Yp1eWq0Ls",
    "STRIPE_API_KEY": "kx8Jd0Qw3Rt6Yp1eAa9z",
    "STRIPE_WEBHOOK_SECRET": "Pw4Rt7Yu1Io3Mn6Bv",
}
CUSTOMER = {
    "card_number": "4111 1111 1111 1111",
    "email": "asha.rao+refunds@example.co.in",
    "phone": "+91 98765 43210",
    "vpa": "asha.rao@okaxis",
}
# Everything that must never appear in anything sent, in every form it could take.
FORBIDDEN = [
    *SECRETS.values(),
    "4111 1111 1111 1111",
    "4111111111111111",
    "asha.rao",
    "example.co.in",
    "98765 43210",
    "9876543210",
    "okaxis",
    "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
]


def leaks(blobs: list[bytes]) -> list[str]:
    text = b"\n".join(blobs).decode("utf-8", errors="replace")
    return [value for value in FORBIDDEN if value in text or json.dumps(value)[1:-1] in text]


def items(envelopes: list[Envelope], kind: str) -> list[dict[str, Any]]:
    found = []
    for envelope in envelopes:
        for item in envelope.items:
            if item.type == kind:
                found.append(json.loads(item.payload.get_bytes()))
    return found


def exceptions(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [
        event
        for event in events
        if any(v.get("type") == kind for v in (event.get("exception") or {}).get("values", []))
    ]


# -- the scrubber on its own -------------------------------------------------------------------


def test_scrubber_removes_secrets_personal_fields_arguments_and_locals() -> None:
    scrub = Scrubber(SECRETS.values())
    event = {
        "event_id": "5f3c1e2a12344c3e89960123456789ab",
        "message": f"refund for {CUSTOMER['email']} card {CUSTOMER['card_number']}",
        "tags": {"task_id": "0123456789-0123-4567-8901-234567890123"},
        "user": {"email": CUSTOMER["email"], "ip_address": "10.0.0.1"},
        "request": {"data": {"body": "raw"}, "headers": {"Authorization": "Basic abc"}},
        "extra": {
            "celery-job": {"task_name": "refunds.submit", "args": [1], "kwargs": {"x": 2}},
            "kwargs": {"refund_id": 7},
            "gateway": {"key_secret": "anything", "RAZORPAY_KEY_ID": "rzp", "amount": 100},
            "customer": {"Phone": "123", "vpa": "x@y", "cardNumber": "1", "note": "ok"},
            "idempotency_key": "rf-7-1",
            "big": 4111111111111111,
        },
        "exception": {
            "values": [
                {
                    "type": "TransientError",
                    "value": f"auth {SECRETS['RAZORPAY_KEY_SECRET']} vpa {CUSTOMER['vpa']}",
                    "stacktrace": {
                        "frames": [
                            {
                                "function": "leak",
                                "lineno": 12,
                                "context_line": f"    phone = '{CUSTOMER['phone']}'",
                                "vars": {"card": CUSTOMER["card_number"]},
                            }
                        ]
                    },
                }
            ]
        },
        "breadcrumbs": {
            "values": [{"message": "observe.customer", "data": {"contact": CUSTOMER["phone"]}}]
        },
    }
    cleaned = scrub(copy.deepcopy(event), {})
    assert cleaned is not None
    assert leaks([json.dumps(cleaned).encode()]) == []
    assert "user" not in cleaned and "data" not in cleaned["request"]
    assert cleaned["extra"]["celery-job"] == {"task_name": "refunds.submit"}
    assert "kwargs" not in cleaned["extra"]
    assert cleaned["extra"]["gateway"] == {
        "key_secret": "[Filtered]",
        "RAZORPAY_KEY_ID": "[Filtered]",
        "amount": 100,
    }
    assert cleaned["extra"]["customer"]["note"] == "ok"
    assert cleaned["extra"]["idempotency_key"] == "rf-7-1"
    assert cleaned["extra"]["big"] == "[Filtered]"
    assert "vars" not in cleaned["exception"]["values"][0]["stacktrace"]["frames"][0]
    assert cleaned["exception"]["values"][0]["value"] == "auth [Filtered] vpa [Filtered vpa]"
    # Ids and line numbers are left alone.
    assert cleaned["event_id"] == event["event_id"]
    assert cleaned["tags"]["task_id"] == event["tags"]["task_id"]
    assert cleaned["exception"]["values"][0]["stacktrace"]["frames"][0]["lineno"] == 12


def test_configured_secrets_include_url_passwords_and_basic_auth() -> None:
    found = configured_secrets(
        load_settings(
            DATABASE_URL="postgresql+psycopg2://u:db-pass-1@h/db",
            BROKER_URL="redis://:broker-pass-2@h:6379/0",
            FLOWER_BASIC_AUTH="ops:flower-pass-3",
            STRIPE_API_KEY="sk_test_abc123",
        )
    )
    assert {"db-pass-1", "broker-pass-2", "flower-pass-3", "sk_test_abc123"} <= set(found)


def luhn_complete(digits: str) -> str:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 == 0 else 1)
        total += n - 9 if n > 9 else n
    return digits + str((10 - total % 10) % 10)


cards = st.builds(
    lambda prefix, body, sep: sep.join(
        luhn_complete(prefix + body)[i : i + 4] for i in range(0, len(prefix + body) + 1, 4)
    ),
    st.sampled_from(["4", "51", "55", "37", "6011", "35"]),
    st.text("0123456789", min_size=11, max_size=14),
    st.sampled_from(["", " ", "-"]),
)
emails = st.from_regex(
    r"[a-z][a-z0-9._+]{0,12}@[a-z][a-z0-9-]{0,10}\.(com|in|co\.in|org)", fullmatch=True
)
phones = st.one_of(
    st.from_regex(r"\+91 ?[6-9][0-9]{4} ?[0-9]{5}", fullmatch=True),
    st.from_regex(r"0?[6-9][0-9]{9}", fullmatch=True),
    st.from_regex(r"\+1 \([2-9][0-9]{2}\) [0-9]{3}-[0-9]{4}", fullmatch=True),
)
vpas = st.from_regex(r"[a-z0-9][a-z0-9.]{2,15}@(okaxis|okhdfcbank|ybl|paytm|upi)", fullmatch=True)
words = st.sampled_from(["refund", "for", "failed:", "card", "(retry 2)", "to", "via", ",", "at"])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(cards, emails, phones, vpas), min_size=1, max_size=4),
    st.lists(words, max_size=6),
)
def test_no_card_email_phone_or_vpa_survives_in_any_text(
    personal: list[str], filler: list[str]
) -> None:
    text = " ".join(filler[: len(filler) // 2] + personal + filler[len(filler) // 2 :])
    cleaned = Scrubber().text(text)
    for value in personal:
        assert value not in cleaned
        digits = "".join(ch for ch in value if ch.isdigit())
        if len(digits) >= 10:
            assert digits[-10:] not in "".join(ch for ch in cleaned if ch.isdigit())


# -- a real task in this process, events captured by a local transport --------------------------


class Recorder(Transport):
    """A transport that keeps every envelope instead of sending it."""

    def __init__(self) -> None:
        super().__init__()
        self.envelopes: list[Envelope] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)


@pytest.fixture
def sentry_here(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """Start Sentry in this process with the given settings in the environment."""

    def start(**env: str) -> Any:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        from workers.celery_app import app

        return app

    yield start
    sentry_sdk.get_client().close()
    monkeypatch.undo()
    get_settings.cache_clear()
    sentry_sdk.init(dsn="")


def test_a_failing_task_reports_its_context_and_nothing_personal(
    committed: Engine, sentry_here: Callable[..., Any]
) -> None:
    # Nothing listens at this DSN: the recorder stands in for the HTTP transport.
    app = sentry_here(SENTRY_DSN="http://publickey@127.0.0.1:9/1", TASK_MAX_RETRIES="1", **SECRETS)
    import tests.observe_tasks  # noqa: F401  (registers observe.leak)

    recorder = Recorder()
    assert sentry.init(get_settings(), app=app, transport=recorder)
    result = app.tasks["observe.leak"].apply(kwargs=CUSTOMER, task_id="leak-in-process")
    assert result.failed()
    sentry_sdk.flush()

    blobs = [envelope.serialize() for envelope in recorder.envelopes]
    assert leaks(blobs) == []
    events = items(recorder.envelopes, "event")
    [error] = exceptions(events, "TransientError")
    assert error["tags"]["task_name"] == "observe.leak"
    assert error["tags"]["task_id"] == "leak-in-process"
    assert str(error["tags"]["task_retries"]) == "1"
    message = error["exception"]["values"][-1]["value"]
    assert "[Filtered card]" in message and "[Filtered email]" in message
    assert all("vars" not in frame for frame in _frames(error))
    assert any(e.get("tags", {}).get("alert") == "observe_leak" for e in events)
    # The dead-lettered log line is not a second event for the same error.
    assert not [
        e for e in events if (e.get("logentry") or {}).get("message") == "task.dead_lettered"
    ]


def _frames(event: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        frame
        for value in event["exception"]["values"]
        for frame in (value.get("stacktrace") or {}).get("frames", [])
    ]


def test_sentry_stays_off_without_a_dsn() -> None:
    assert not sentry.init(load_settings())


def test_beat_entries_sentry_crons_cannot_monitor_are_left_out() -> None:
    from workers.celery_app import app

    assert sentry.unmonitorable_entries(app) == ["^sweep\\-expired\\-holds$"]


# -- a real worker, its envelopes sent over HTTP to a local endpoint -----------------------------


class SentryEndpoint:
    """A local stand-in for sentry.io that keeps every envelope it is sent."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                endpoint.bodies.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.dsn = f"http://publickey@127.0.0.1:{self.server.server_address[1]}/1"

    def envelopes(self) -> list[Envelope]:
        return [Envelope.deserialize(body) for body in list(self.bodies)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint() -> Iterator[SentryEndpoint]:
    server = SentryEndpoint()
    yield server
    server.close()


@pytest.mark.e2e
def test_a_real_worker_sends_scrubbed_errors_and_cron_check_ins(
    start_worker: Callable[..., Proc],
    redis: redis_lib.Redis,
    endpoint: SentryEndpoint,
    sentry_here: Callable[..., Any],
    tmp_path: Path,
) -> None:
    env = {
        "SENTRY_DSN": endpoint.dsn,
        "SENTRY_ENVIRONMENT": "test",
        "TASK_MAX_RETRIES": "1",
        "TASK_RETRY_BASE_SECONDS": "0.05",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        **SECRETS,
    }
    worker = start_worker("-I", "tests.observe_tasks", **env)
    assert "sentry.started" in worker.output()
    from workers.celery_app import app

    sent = app.send_task("observe.leak", kwargs=CUSTOMER)

    def error_events() -> list[dict[str, Any]]:
        return exceptions(items(endpoint.envelopes(), "event"), "TransientError")

    [error] = wait_until(error_events, timeout=30)  # type: ignore[misc]
    assert error["tags"]["task_name"] == "observe.leak"
    assert error["tags"]["task_id"] == sent.id
    assert str(error["tags"]["task_retries"]) == "1"
    assert error["tags"]["task_queue"] == "default"
    assert error["environment"] == "test"
    assert error["extra"]["celery-job"] == {"task_name": "observe.leak"}
    message = error["exception"]["values"][-1]["value"]
    for marker in ("[Filtered card]", "[Filtered email]", "[Filtered phone]", "[Filtered vpa]"):
        assert marker in message
    assert all("vars" not in frame for frame in _frames(error))
    crumbs = [c.get("message") for c in error["breadcrumbs"]["values"]]
    assert "observe.customer" in crumbs  # the log line is there, its personal data is not
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(DeadLetter)) == 1

    # Beat's side of a cron monitor: this process stands in for beat and applies two entries.
    sentry_here(SENTRY_DSN=endpoint.dsn)
    sentry.init(get_settings(), app=app)
    from celery.beat import Scheduler

    scheduler = Scheduler(app=app, lazy=True)
    for name in ("retry-stuck-refunds", "sweep-expired-holds"):
        entry = scheduler.Entry(name=name, app=app, **copy.deepcopy(app.conf.beat_schedule[name]))
        scheduler.apply_entry(entry)
    sentry_sdk.flush()

    def check_ins(slug: str) -> list[dict[str, Any]]:
        return [c for c in items(endpoint.envelopes(), "check_in") if c["monitor_slug"] == slug]

    wait_until(
        lambda: {c["status"] for c in check_ins("retry-stuck-refunds")} == {"in_progress", "ok"}
    )
    started, finished = sorted(
        check_ins("retry-stuck-refunds"), key=lambda c: c["status"] != "in_progress"
    )
    assert started["check_in_id"] == finished["check_in_id"]
    assert started["monitor_config"]["schedule"] == {"type": "crontab", "value": "*/30 * * * *"}

    def swept() -> bool:
        with session_scope() as session:
            return bool(
                session.scalar(select(func.count()).where(JobRun.job_name == "holds.sweep_expired"))
            )

    wait_until(swept)
    assert check_ins("sweep-expired-holds") == []  # 5-second interval: not a Sentry monitor
    assert leaks(list(endpoint.bodies)) == []
