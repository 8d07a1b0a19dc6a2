"""Fixtures on the real PostgreSQL and Redis that `make test` starts (tests/services.py).

Plain functions are tested inside an outer transaction rolled back at teardown; tests of
concurrency and of real workers commit for real and truncate the tables afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis as redis_lib
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parent.parent
TABLES = (
    "state_transitions",
    "reconciliation_discrepancies",
    "reconciliation_runs",
    "refunds",
    "payments",
    "notifications",
    "dead_letters",
    "webhook_events",
    "job_runs",
    "booking_holds",
)


def _required(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        pytest.exit(
            f"{name} is not set: run the suite with `make test`, which starts "
            "PostgreSQL and Redis for it",
            returncode=2,
        )
    return value


DATABASE_URL = _required("DATABASE_URL")
BROKER_URL = _required("BROKER_URL")
if not DATABASE_URL.startswith("postgresql"):
    pytest.exit("DATABASE_URL must be PostgreSQL for the test suite", returncode=2)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


@pytest.fixture(scope="session")
def pg_engine() -> Iterator[Engine]:
    from workers.migrate import upgrade

    engine = create_engine(DATABASE_URL)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    upgrade(DATABASE_URL)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def sqlite_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    from workers.db import make_engine
    from workers.migrate import upgrade

    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'backstop.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def _rolled_back_session(engine: Engine) -> Iterator[Session]:
    connection = engine.connect()
    outer = connection.begin()
    session = Session(
        bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    )
    try:
        yield session
    finally:
        session.close()
        outer.rollback()
        connection.close()


@pytest.fixture
def db(pg_engine: Engine) -> Iterator[Session]:
    """A session on Postgres inside an outer transaction that is rolled back at teardown."""
    yield from _rolled_back_session(pg_engine)


@pytest.fixture(params=["postgresql", "sqlite"])
def any_db(request: pytest.FixtureRequest) -> Iterator[Session]:
    """The same, once on Postgres and once on the embedded SQLite default."""
    engine = request.getfixturevalue(
        "pg_engine" if request.param == "postgresql" else "sqlite_engine"
    )
    yield from _rolled_back_session(engine)


def truncate(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))


@pytest.fixture
def committed(pg_engine: Engine) -> Iterator[Engine]:
    """The Postgres engine for tests that commit; every table is emptied afterwards."""
    truncate(pg_engine)
    yield pg_engine
    truncate(pg_engine)


@pytest.fixture
def redis() -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(BROKER_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


class Proc:
    """A process of ours, started with its own log file and stopped by PID."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
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
                raise AssertionError(f"process exited early:\n{self.output()[-4000:]}")
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


def service_env(**overrides: str) -> dict[str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": DATABASE_URL,
        "BROKER_URL": BROKER_URL,
        "PYTHONUNBUFFERED": "1",
    }
    env.update(overrides)
    return env


@pytest.fixture
def start_worker(
    committed: Engine, redis: redis_lib.Redis, tmp_path: Path
) -> Iterator[Callable[..., Proc]]:
    """Start a real Celery worker (prefork) on the Redis broker; stopped at teardown."""
    started: list[Proc] = []

    def start(
        *extra: str,
        queues: str = "critical,default,notifications,batch",
        concurrency: int = 2,
        **env: str,
    ) -> Proc:
        name = f"test{len(started)}"
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers",
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
        ]
        proc = Proc(argv, service_env(**env), tmp_path / f"{name}.log")
        started.append(proc)
        proc.wait_for("ready.")
        return proc

    yield start
    for proc in started:
        proc.stop()


def wait_until(check: Callable[[], object], timeout: float = 30.0, every: float = 0.1) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {value!r})")
        time.sleep(every)
