"""Processes of ours for tests and benchmarks: Celery workers, beat and Flower, each with its
own log file and process group, stopped by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CELERY = [sys.executable, "-m", "celery", "-A", "workers"]


class Proc:
    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.node = ""  # a worker's node name, for remote control
        self.popen = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
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
