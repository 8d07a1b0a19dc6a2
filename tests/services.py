"""Run a command beside a private PostgreSQL and a private Redis, then stop both.

    python -m tests.services -- pytest -q

Both listen on free loopback ports in a fresh temporary directory and are stopped by PID when the
command ends, whatever its outcome. PostgreSQL refuses to run as root, so when run as root the
cluster belongs to the unprivileged `postgres` user. The command sees DATABASE_URL and BROKER_URL.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pg_tool(name: str) -> str:
    for folder in PG_BIN_DIRS:
        path = Path(folder) / name
        if path.exists():
            return str(path)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"services: {name} not found; install postgresql-15")
    return found


def _as_postgres() -> dict[str, object]:
    """Popen arguments that run a child as `postgres` when we are root; the child's PID is then
    the server's own, so it can be stopped by PID."""
    if os.geteuid() != 0:
        return {}
    return {"user": "postgres", "group": "postgres", "extra_groups": []}


def _wait_for_port(port: int, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise SystemExit(f"services: {what} did not start on port {port} within {timeout:.0f}s")


@contextlib.contextmanager
def postgres(root: Path) -> Iterator[str]:
    data, sockets = root / "pgdata", root / "pgsock"
    sockets.mkdir()
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(root, entry.pw_uid, entry.pw_gid)
        os.chown(sockets, entry.pw_uid, entry.pw_gid)
    port = _free_port()
    subprocess.run(
        [
            _pg_tool("initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        cwd=root,
        **_as_postgres(),
    )
    options = (
        f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
        "-c shared_buffers=256MB"
    )
    log = root / "postgres.log"
    server = subprocess.Popen(
        [_pg_tool("postgres"), "-D", str(data), *options.split()],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=root,
        **_as_postgres(),
    )
    try:
        _wait_for_port(port, "postgres")
        for _ in range(100):
            ready = subprocess.run(
                [_pg_tool("pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"],
                stdout=subprocess.DEVNULL,
            )
            if ready.returncode == 0:
                break
            time.sleep(0.1)
        subprocess.run(
            [
                _pg_tool("createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "postgres",
                "backstop",
            ],
            check=True,
        )
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/backstop"
    finally:
        _stop(server, signal.SIGINT)  # postgres' "fast" shutdown


@contextlib.contextmanager
def redis(root: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if not binary:
        raise SystemExit("services: redis-server not found; `make test` installs it with apt")
    port = _free_port()
    folder = root / "redis"
    folder.mkdir()
    server = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(folder),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ],
        stdout=(root / "redis.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_for_port(port, "redis")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(server, signal.SIGTERM)


def _stop(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("usage: python -m tests.services -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="backstop-services-"))
    os.chmod(root, 0o755)
    try:
        with postgres(root) as database_url, redis(root) as broker_url:
            env = {
                **os.environ,
                "DATABASE_URL": database_url,
                "BROKER_URL": broker_url,
                "POSTGRES_LOG": str(root / "postgres.log"),
            }
            print(f"services: postgres {database_url}  redis {broker_url}", flush=True)
            child = subprocess.Popen(argv, env=env)
            try:
                return child.wait()
            except KeyboardInterrupt:
                child.send_signal(signal.SIGINT)
                return child.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
