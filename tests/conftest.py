"""Fixtures on the real PostgreSQL and Redis that `make test` starts (tests/services.py).

Plain functions are tested inside an outer transaction rolled back at teardown; tests of
concurrency and of real workers commit for real and truncate the tables afterwards.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from tests import processes
from tests.processes import Proc

TABLES = (
    "state_transitions",
    "reconciliation_discrepancies",
    "reconciliation_runs",
    "refunds",
    "payments",
    "notification_attempts",
    "notifications",
    "dead_letter_events",
    "push_tokens",
    "dead_letters",
    "webhook_events",
    "job_runs",
    "scheduled_jobs",
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
    from workers.db.migrate import upgrade

    engine = create_engine(DATABASE_URL)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    upgrade(DATABASE_URL)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def sqlite_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    from workers.db import make_engine
    from workers.db.migrate import upgrade

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
        proc = processes.worker(
            name,
            service_env(**env),
            tmp_path / f"{name}.log",
            *extra,
            queues=queues,
            concurrency=concurrency,
        )
        started.append(proc)
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


@pytest.fixture(scope="session")
def simulator_server() -> Iterator[object]:
    from workers.devtools.simulator import SimulatorServer

    with SimulatorServer() as server:
        yield server


@pytest.fixture
def sim(simulator_server: Any) -> Any:
    """The gateway simulator's state, reset: payments, refunds, faults and effect counters."""
    simulator_server.state.reset()
    return simulator_server.state


@pytest.fixture
def gateways(simulator_server: Any, sim: Any) -> dict[str, Any]:
    """Both adapters on the official SDKs, over HTTP to the simulator, with a short timeout so
    a hung request is a lost response within the test."""
    from workers.gateways.razorpay import RazorpayGateway
    from workers.gateways.stripe import StripeGateway

    return {
        "razorpay": RazorpayGateway(
            sim.razorpay_key_id, sim.razorpay_key_secret, simulator_server.url, timeout=0.5
        ),
        "stripe": StripeGateway(sim.stripe_api_key, simulator_server.url, timeout=0.5),
    }


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[Any]:
    from tests.smtp_sink import SmtpSink

    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def smtp(smtp_server: Any) -> Any:
    """A real SMTP server (aiosmtpd) in this process, emptied: what arrived, what to refuse."""
    smtp_server.handler.reset()
    return smtp_server


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[Any]:
    from workers.devtools.sandbox import SandboxServer

    with SandboxServer() as server:
        yield server


@pytest.fixture
def sandbox(sandbox_server: Any) -> Any:
    """The local SMS/push provider's state, reset: deliveries, faults, unregistered tokens."""
    sandbox_server.state.reset()
    return sandbox_server.state


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if it left a broker artifact in the checkout: kombu's filesystem transport
    writes its exchange table to `control/` in the current directory unless told otherwise,
    and once a test left `control/default.exchange` to be committed by accident."""
    stray = Path(__file__).resolve().parent.parent / "control"
    if stray.exists():
        print(f"\nthe run left {stray} behind: a filesystem transport without control_folder")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
