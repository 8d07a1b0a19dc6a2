"""Error sorting: what is worth retrying, and what goes straight to the dead-letter table."""

from __future__ import annotations

import socket
from enum import StrEnum
from typing import Any

import kombu.exceptions
import redis.exceptions
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import exc as sa_exc


class Classification(StrEnum):
    TRANSIENT = "TRANSIENT"
    PERMANENT = "PERMANENT"
    UNKNOWN = "UNKNOWN"


class BackstopError(Exception):
    """Base of backstop's own errors; the class says how it sorts."""

    classification = Classification.PERMANENT


class PermanentError(BackstopError):
    """Retrying cannot help: bad input, a missing row, a rule broken."""


class TransientError(BackstopError):
    """Retrying later may help: the other side is busy or unreachable."""

    classification = Classification.TRANSIENT


class RetryRemaining(TransientError):
    """Part of a batch task is done and committed; retry only the rest, whose payload is
    `kwargs`. Exhausted, the dead letter keeps that narrowed payload."""

    def __init__(self, message: str, kwargs: dict[str, Any]) -> None:
        super().__init__(message)
        self.kwargs = kwargs


class Defer(Exception):
    """Run this task again in `seconds`, as a fresh message that spends no retry: the work
    cannot start yet (a gateway's circuit breaker is open) and nothing was done."""

    def __init__(self, seconds: float, reason: str) -> None:
        super().__init__(reason)
        self.seconds = seconds


class DeferredTooLong(BackstopError):
    """A task kept deferring (its gateway's breaker stayed open) for longer than
    TASK_DEFER_MAX_SECONDS. The cause is transient, but retrying would only defer again: it
    goes straight to the dead-letter queue, where its own triage rule asks for a person."""

    classification = Classification.TRANSIENT
    retryable = False


class PayloadError(PermanentError):
    """A task payload failed validation; the message names the field."""


class TaskKillsItsProcess(PermanentError):
    """The worker process running the task died under it again and again (a crash in native
    code, the OOM killer): running it once more would only kill another."""


class UnknownTask(PermanentError):
    """A message names a task no worker has."""


class UndecodableMessage(PermanentError):
    """A message whose body the worker may not (not JSON) or cannot (malformed) decode."""


class NotFound(PermanentError):
    """The row a task was asked about does not exist."""


# SQLSTATEs that a later attempt can get past: serialization failure, deadlock, lock timeout,
# statement timeout or cancel, admin shutdown, too many connections, and the connection class.
TRANSIENT_SQLSTATES = frozenset(
    {"40001", "40P01", "55P03", "57014", "57P01", "57P02", "57P03", "53300", "53400"}
)

TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    SoftTimeLimitExceeded,  # the task ran past TASK_SOFT_TIME_LIMIT_SECONDS: try again later
    TimeoutError,
    ConnectionError,
    socket.timeout,
    sa_exc.TimeoutError,  # connection pool exhausted
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    kombu.exceptions.OperationalError,
)


def sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    return getattr(orig, "pgcode", None)


def classify(exc: BaseException) -> Classification:
    """Sort an exception into TRANSIENT or PERMANENT (UNKNOWN is for outcomes, not errors)."""
    if isinstance(exc, BackstopError):
        return exc.classification
    if isinstance(exc, sa_exc.DBAPIError):
        code = sqlstate(exc)
        if exc.connection_invalidated:
            return Classification.TRANSIENT
        if code is not None:
            if code in TRANSIENT_SQLSTATES or code.startswith("08"):
                return Classification.TRANSIENT
            return Classification.PERMANENT
        # No SQLSTATE: the server could not be reached, or SQLite said "database is locked".
        if isinstance(exc, sa_exc.OperationalError):
            return Classification.TRANSIENT
        return Classification.PERMANENT
    if isinstance(exc, TRANSIENT_EXCEPTIONS):
        return Classification.TRANSIENT
    return Classification.PERMANENT


def retryable(exc: BaseException) -> bool:
    """Whether running the task again later may help: a transient error, unless it says
    otherwise (`DeferredTooLong`)."""
    return classify(exc) is Classification.TRANSIENT and getattr(exc, "retryable", True)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, as the dead-letter table and logs show it."""
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())
