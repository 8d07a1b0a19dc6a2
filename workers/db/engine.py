"""The engine, sessions and their transactions, and work to do once a transaction commits."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from config import get_settings
from config.settings import VAR_DIR

log = logging.getLogger("backstop.db")
_lock = threading.Lock()
_engine: Engine | None = None
_engine_pid: int | None = None
_sessionmaker: sessionmaker[Session] | None = None

AFTER_COMMIT = "backstop.after_commit"


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """An engine for `url` (default: DATABASE_URL) with backstop's per-session settings."""
    settings = get_settings()
    url = url or settings.DATABASE_URL
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, **kwargs)
    timeouts = (
        f"-c lock_timeout={settings.DB_LOCK_TIMEOUT_MS} "
        f"-c statement_timeout={settings.DB_STATEMENT_TIMEOUT_MS} "
        f"-c idle_in_transaction_session_timeout={settings.DB_IDLE_IN_TRANSACTION_TIMEOUT_MS}"
    )
    options = {
        "pool_pre_ping": True,
        "pool_size": 5,
        "max_overflow": 10,
        "connect_args": {"options": timeouts, "application_name": "backstop"},
    }
    options.update(kwargs)
    return create_engine(url, **options)


def _sqlite_engine(url: str, **kwargs: Any) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, begin transactions, so BEGIN IMMEDIATE below is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        # SQLite has no row locks: taking the write lock when the transaction starts makes
        # every read-then-write transaction serial, which is what the row locks give on
        # Postgres, and avoids the deadlock of two readers both upgrading to writers.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def get_engine() -> Engine:
    """The process's engine, made anew in a forked child (connections are not fork-safe)."""
    global _engine, _engine_pid, _sessionmaker
    with _lock:
        if _engine is None or _engine_pid != os.getpid():
            if _engine is not None:
                # Forked: drop the parent's pooled connections without closing them under it.
                _engine.dispose(close=False)
            _engine = make_engine()
            _engine_pid = os.getpid()
            _sessionmaker = sessionmaker(_engine, expire_on_commit=False)
        return _engine


class DatabaseMissing(Exception):
    """DATABASE_URL names no backstop database; the message says where it looked, one line."""


def check_database() -> None:
    """Raise DatabaseMissing unless DATABASE_URL holds backstop's tables. An embedded SQLite
    file that does not exist is not opened, since opening would create it empty."""
    settings = get_settings()
    url = make_url(settings.DATABASE_URL)
    where = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        where = str(Path(url.database))
        if not Path(url.database).is_file():
            origin = (
                "set by DATABASE_URL"
                if "DATABASE_URL" in settings.model_fields_set
                else f"the embedded default: BACKSTOP_VAR_DIR is {VAR_DIR}"
            )
            raise DatabaseMissing(
                f"no database at {where}: the file does not exist ({origin}); "
                "run `backstop db upgrade` first, or set DATABASE_URL"
            )
    # Alembic's own table: there once `backstop db upgrade` has run.
    if not inspect(get_engine()).has_table("alembic_version"):
        raise DatabaseMissing(
            f"the database at {where} has no backstop tables: run `backstop db upgrade` first"
        )


def dispose_engine() -> None:
    """Forget the engine after a fork, leaving the parent's connections to the parent."""
    global _engine, _sessionmaker
    with _lock:
        if _engine is not None:
            _engine.dispose(close=False)
        _engine = None
        _sessionmaker = None


def new_session() -> Session:
    get_engine()
    assert _sessionmaker is not None
    return _sessionmaker()


@contextlib.contextmanager
def session_scope(session: Session | None = None) -> Iterator[Session]:
    """One session and one transaction: committed when the block ends, rolled back on error."""
    session = session or new_session()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def on_commit(session: Session, callback: Callable[[], object]) -> None:
    """Run `callback` once the session's current transaction commits; drop it on rollback."""
    session.info.setdefault(AFTER_COMMIT, []).append(callback)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    # The transaction has committed: a failing callback (the broker is down) must not make it
    # look failed. It is logged; the sweep that owns the row's state finds what was not sent.
    callbacks = session.info.pop(AFTER_COMMIT, [])
    for callback in callbacks:
        try:
            callback()
        except Exception as exc:
            log.error("after_commit.failed", extra={"error": f"{type(exc).__name__}: {exc}"})


@event.listens_for(Session, "after_soft_rollback")
def _drop_after_rollback(session: Session, previous_transaction: Any) -> None:
    if previous_transaction.parent is None:  # only the outermost transaction's rollback
        session.info.pop(AFTER_COMMIT, None)
