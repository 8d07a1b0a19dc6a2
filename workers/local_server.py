"""The local HTTP stand-ins (the gateway simulator, the notification sandbox) on werkzeug:
in a background thread for tests and benches, or in the foreground for `make run`."""

from __future__ import annotations

import logging
import sys
import threading
from types import TracebackType
from typing import Any, Self

from werkzeug.serving import make_server


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
