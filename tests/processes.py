"""Processes of ours for tests and benchmarks: Celery workers, beat and Flower, each with its
own log file and process group, stopped by PID."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests import services

ROOT = Path(__file__).resolve().parent.parent
CELERY = [sys.executable, "-m", "celery", "-A", "workers"]


class Proc:
    def __init__(self, argv: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> None:
        self.log = log
        self.node = ""  # a worker's node name, for remote control
        self.popen = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, marker: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.output():
                return
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.log.stem} exited early:\n{self.output()[-4000:]}")
            time.sleep(0.1)
        raise AssertionError(f"{marker!r} not seen in {timeout}s:\n{self.output()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        return self.popen.returncode


def worker(
    name: str, env: dict[str, str], log: Path, *extra: str, queues: str, concurrency: int = 2
) -> Proc:
    """A prefork worker on `queues`, started and ready."""
    proc = Proc(
        [
            *CELERY,
            "worker",
            "-Q",
            queues,
            "-c",
            str(concurrency),
            "-n",
            f"{name}@%h",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            *extra,
        ],
        env,
        log,
    )
    proc.wait_for("ready.")
    proc.node = f"{name}@{socket.gethostname()}"
    return proc


def beat(env: dict[str, str], log: Path, schedule: Path) -> Proc:
    proc = Proc([*CELERY, "beat", f"--schedule={schedule}", "--loglevel=INFO"], env, log)
    proc.wait_for("beat: Starting")
    return proc


class RedisServer:
    """A private redis-server a test may SIGKILL and start again on the same port and data
    folder, persisting as production does (AOF)."""

    def __init__(self, folder: Path, fsync: str = "always") -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.binary = shutil.which("redis-server") or "redis-server"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.fsync = fsync
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.starts += 1
        log = (self.folder / "redis.log").open("ab")
        self.popen = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--appendonly",
                "yes",
                "--appendfsync",
                self.fsync,
                "--save",
                "",
                "--daemonize",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"redis-server did not start on {self.port}")

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a node failure would: no AOF rewrite, no goodbye."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


class PostgresServer:
    """A private PostgreSQL a bench or test may restart (fast shutdown, then start again on the
    same port and data), run as the unprivileged `postgres` user when we are root."""

    def __init__(self, folder: Path) -> None:
        self.services = services
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        self.data = folder / "pgdata"
        self.sockets = folder / "pgsock"
        self.port = services._free_port()
        self.popen: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/backstop"

    def create(self) -> None:
        """initdb, start, and create the `backstop` database."""
        self.sockets.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.sockets, entry.pw_uid, entry.pw_gid)
        tool = self.services._pg_tool
        subprocess.run(
            [tool("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync"],
            check=True,
            stdout=subprocess.DEVNULL,
            cwd=self.folder,
            **self.services._as_postgres(),
        )
        self.start()
        subprocess.run(
            [
                tool("createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "backstop",
            ],
            check=True,
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self.popen = subprocess.Popen(
            [self.services._pg_tool("postgres"), "-D", str(self.data), *options.split()],
            stdout=(self.folder / "postgres.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.folder,
            **self.services._as_postgres(),
        )
        self.services._wait_for_port(self.port, "postgres")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [self.services._pg_tool("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                stdout=subprocess.DEVNULL,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError("postgres did not become ready")

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.services._stop(self.popen, signal.SIGINT)  # fast shutdown

    def restart(self) -> None:
        self.restarts += 1
        self.stop()
        self.start()


class Sender(threading.Thread):
    """Sends `task` by name at a steady rate, one message per payload, through whatever
    happens to Redis. A message counts as accepted once Redis answered the publish; one refused
    while Redis is down is not (the sender saw the error: it may send it again)."""

    def __init__(self, url: str, task: str, payloads: list[dict[str, Any]], rate: float) -> None:
        super().__init__(daemon=True)
        self.url, self.task, self.gap = url, task, 1 / rate
        self.todo = list(payloads)
        self.accepted: list[dict[str, Any]] = []
        self.refused = 0
        self.stop = threading.Event()

    def run(self) -> None:
        # Imported here: the app reads the settings when it is imported, and a bench imports
        # this module before its environment is complete.
        from kombu import Connection

        from workers.celery_app import app

        with Connection(self.url, connect_timeout=1) as conn:
            while self.todo and not self.stop.is_set():
                try:
                    app.send_task(self.task, kwargs=self.todo[0], connection=conn, retry=False)
                except Exception:
                    self.refused += 1
                    conn.close()
                    time.sleep(0.2)
                    continue
                self.accepted.append(self.todo.pop(0))
                time.sleep(self.gap)
