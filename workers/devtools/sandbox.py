"""A local SMS and push provider speaking the contract of workers/notify/channels.py, with
fault injection and delivery counts. Tests, the benchmark and `make run` point
SMS_PROVIDER_URL / PUSH_PROVIDER_URL at it; production never does.

    POST /sms   {"to": "+14155550123", "body": "..."}                  -> 200 {"id": "sms_1"}
    POST /push  {"token": "...", "title": "...", "body": "...", "data": {}} -> 200 {"id": "push_1"}

A push to an unregistered token answers 410 `{"error": "Unregistered"}`. A request repeating
an `Idempotency-Key` gets the first answer again and delivers nothing new. `GET /_sandbox/stats`
shows what arrived.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, jsonify, request

from workers.devtools.local_server import BackgroundServer, FaultRule, Faults, serve_foreground

API_KEY = "sandbox-key"
FAULT_KINDS = ("latency", "400", "429", "500", "502", "503", "timeout")


class SandboxState:
    """What the provider has received, and the faults it will answer with. Thread-safe."""

    def __init__(self, api_key: str = API_KEY) -> None:
        self.api_key = api_key
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.delivered: list[dict[str, Any]] = []
            self.requests: Counter[str] = Counter()
            self.by_key: dict[str, tuple[int, dict[str, Any]]] = {}
            self.unregistered: set[str] = set()
            self.faults = Faults()

    def add_fault(self, endpoint: str, kind: str, **options: Any) -> None:
        """Inject `kind` into requests to `endpoint` ("sms", "push" or "*"); options as
        `FaultRule`'s (`remaining`, `latency_ms`, `hang_seconds`, `rate`)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {FAULT_KINDS}")
        self.faults.add(FaultRule(endpoint, kind, **options))

    def clear_faults(self) -> None:
        self.faults.clear()

    def unregister(self, *tokens: str) -> None:
        with self._lock:
            self.unregistered.update(tokens)

    def messages(self, channel: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [m for m in self.delivered if channel is None or m["channel"] == channel]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            keys = Counter(m["key"] for m in self.delivered if m["key"])
            return {
                "delivered": len(self.delivered),
                "requests": dict(self.requests),
                "faults_injected": self.faults.injected(),
                "duplicate_keys": sorted(key for key, count in keys.items() if count > 1),
            }

    def handle(self, endpoint: str, body: dict[str, Any], key: str | None) -> tuple[int, dict]:
        with self._lock:
            self.requests[endpoint] += 1
            if key and key in self.by_key:
                return self.by_key[key]
        admission = self.faults.admit(endpoint)
        time.sleep(admission.latency_seconds)  # no lock held: other requests go on meanwhile
        fault = admission.fault
        if fault is not None:
            if fault.kind == "timeout":
                time.sleep(fault.hang_seconds)
                return 504, {"error": "timeout"}
            code = int(fault.kind)
            return code, {"error": "injected", "status": code}
        problem = _invalid(endpoint, body)
        if problem:
            return 400, {"error": problem}
        with self._lock:
            if endpoint == "push" and body["token"] in self.unregistered:
                return 410, {"error": "Unregistered"}
            if key and key in self.by_key:  # a concurrent repeat got there first
                return self.by_key[key]
            message_id = f"{endpoint}_{len(self.delivered) + 1}"
            self.delivered.append({"channel": endpoint, "id": message_id, "key": key, **body})
            answer = (200, {"id": message_id})
            if key:
                self.by_key[key] = answer
            return answer


def _invalid(endpoint: str, body: dict[str, Any]) -> str | None:
    fields = ("to", "body") if endpoint == "sms" else ("token", "title", "body")
    for name in fields:
        if not isinstance(body.get(name), str) or not body[name]:
            return f"{name} is required"
    return None


def create_app(state: SandboxState) -> Flask:
    app = Flask("backstop-notify-sandbox")

    def provider(endpoint: str) -> tuple[Response, int]:
        if request.headers.get("Authorization") != f"Bearer {state.api_key}":
            return jsonify(error="invalid API key"), 401
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return jsonify(error="expected a JSON object"), 400
        status, answer = state.handle(endpoint, body, request.headers.get("Idempotency-Key"))
        return jsonify(answer), status

    app.add_url_rule("/sms", "sms", lambda: provider("sms"), methods=["POST"])
    app.add_url_rule("/push", "push", lambda: provider("push"), methods=["POST"])
    app.add_url_rule("/_sandbox/stats", "stats", lambda: jsonify(state.stats()))
    app.add_url_rule("/_sandbox/messages", "messages", lambda: jsonify(state.messages()))
    return app


class SandboxServer(BackgroundServer):
    """The sandbox on a threaded werkzeug server in a daemon thread; `.url` is its base URL."""

    def __init__(
        self, state: SandboxState | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.state = state if state is not None else SandboxState()
        super().__init__(create_app(self.state), host, port, "notify-sandbox")


def serve(
    host: str,
    port: int,
    *,
    api_key: str = API_KEY,
    setup: Callable[[SandboxState], object] | None = None,
) -> None:
    """Run the sandbox in the foreground until interrupted; `setup` prepares its state."""
    state = SandboxState(api_key)
    if setup is not None:
        setup(state)
    serve_foreground(create_app(state), host, port, "notification sandbox (SMS, push) on {url}")
