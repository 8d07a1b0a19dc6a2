"""The local HTTP stand-ins (the gateway simulator, the notification sandbox) on werkzeug:
in a background thread for tests and benches, or in the foreground for `make run`."""

from __future__ import annotations

import fnmatch
import logging
import random
import sys
import threading
from collections import Counter
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Self

from werkzeug.serving import make_server


@dataclass
class FaultRule:
    """Inject `kind` into a fraction `rate` of the requests to endpoints matching `endpoint`
    (`*` wildcards)."""

    endpoint: str
    kind: str
    rate: float = 1.0
    latency_ms: int = 0
    hang_seconds: float = 3.0
    remaining: int | None = None  # None: no limit

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Admission:
    """What a request gets: the latency to add (outside any lock), and the fault to answer
    with, if any."""

    latency_seconds: float = 0.0
    fault: FaultRule | None = None


class Faults:
    """A stand-in's fault rules, thread-safe, with a seeded RNG so that a run's faults can be
    replayed. Every matching latency rule that fires adds up; the first other rule that fires
    decides the outcome."""

    def __init__(self, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._injected: Counter[str] = Counter()
        self._rng = random.Random(seed)

    def seed(self, seed: int) -> None:
        with self._lock:
            self._rng = random.Random(seed)

    def add(self, rule: FaultRule) -> dict[str, Any]:
        with self._lock:
            self._rules.append(rule)
            return rule.to_dict()

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def rules(self) -> list[dict[str, Any]]:
        with self._lock:
            return [rule.to_dict() for rule in self._rules]

    def injected(self) -> dict[str, int]:
        with self._lock:
            return dict(self._injected)

    def admit(self, endpoint: str) -> Admission:
        admission = Admission()
        with self._lock:
            for rule in self._rules:
                if rule.remaining == 0 or not fnmatch.fnmatchcase(endpoint, rule.endpoint):
                    continue
                if admission.fault is not None and rule.kind != "latency":
                    continue
                if self._rng.random() >= rule.rate:
                    continue
                if rule.remaining is not None:
                    rule.remaining -= 1
                self._injected[rule.kind] += 1
                if rule.kind == "latency":
                    admission.latency_seconds += rule.latency_ms / 1000
                else:
                    admission.fault = rule
        return admission


def quiet_access_log() -> None:
    # One access-log line per request would drown test and benchmark output.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)


class BackgroundServer:
    """`app` on a threaded werkzeug server in a daemon thread; `.url` is its base URL. Use as a
    context manager, or call `stop()`."""

    def __init__(self, app: Any, host: str, port: int, name: str) -> None:
        quiet_access_log()
        self._server = make_server(host, port, app, threaded=True)
        self.url = f"http://{host}:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name=name, daemon=True)
        self._stopped = False
        self._thread.start()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def serve_foreground(app: Any, host: str, port: int, banner: str) -> None:
    """Serve `app` until interrupted, after printing `banner` (`{url}` is filled in)."""
    quiet_access_log()
    server = make_server(host, port, app, threaded=True)
    print(banner.format(url=f"http://{host}:{server.server_port}"), file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
