"""One base Task and one decorator that own everything cutting across tasks.

A task body gets a `TaskContext` (a session in an open transaction, the clock, the attempt) and
its validated payload; the base commits the transaction, sends after-commit work, binds logs,
and sorts errors: transient ones are retried with backoff and jitter, permanent ones and
exhausted retries are written to `dead_letters`, and the worker goes on either way.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from billiard.exceptions import WorkerLostError
from celery import Task, shared_task
from celery.exceptions import Reject, Retry, TimeLimitExceeded
from celery.worker import state as worker_state
from celery.worker.request import Request
from sqlalchemy.orm import Session

from config import get_settings
from config.schedule import current_slot
from config.settings import Settings
from workers import dead_letters
from workers.db import Steps, session_scope
from workers.errors import (
    Defer,
    DeferredTooLong,
    PayloadError,
    RetryRemaining,
    TaskKillsItsProcess,
    classify,
    one_line,
    retryable,
)
from workers.jobs import held_slot, record_heartbeat, run_in_slot
from workers.messaging.broker import broker_redis
from workers.messaging.enqueue import enqueue_after_commit, send
from workers.payloads import Payload, validate
from workers.retry import backoff_delay

log = logging.getLogger("backstop.task")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class TaskContext:
    """What a task body works with. `now` is read once, when the run starts; `clock` reads the
    time as the work goes on (a test drives both)."""

    session: Session
    now: datetime
    task_id: str | None
    task_name: str
    retries: int
    clock: Callable[[], datetime] = utcnow

    @property
    def steps(self) -> Steps:
        """This run's transaction, lent to a service that commits between its steps."""
        return Steps(self.session)

    def step(self, name: str) -> contextlib.AbstractContextManager[Session]:
        """`with ctx.step("name"):` runs one step of this task and commits it at the end."""
        return self.steps.step(name)

    def enqueue(self, task_name: str, kwargs: dict[str, Any], **options: Any) -> None:
        """Send another task once this run's transaction commits."""
        enqueue_after_commit(self.session, task_name, kwargs, **options)

    def heartbeat(self, counts: dict[str, int]) -> None:
        """Record this run of a job that runs every few seconds (the job is the task's name)
        on its hour's heartbeat row, which the schedule checks read."""
        record_heartbeat(
            self.session,
            self.task_name,
            started_at=self.now,
            finished_at=self.clock(),
            outcome="OK",
            counts=counts,
            task_id=self.task_id,
        )

    def in_slot(self, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run this scheduled task's `work` once for its schedule slot (the job is the task's
        name): the slot this task id already holds (an operator's run now, a redelivery), else
        the one `now` falls in. A second beat or a manual run in the same slot does nothing
        (see `workers.jobs.claim_slot`)."""
        slot = held_slot(self.session, self.task_name, self.task_id) or current_slot(
            self.task_name, get_settings(), self.now
        )
        return run_in_slot(
            self.session,
            self.task_name,
            slot,
            task_id=self.task_id,
            now=self.now,
            clock=self.clock,
            work=work,
        )


Body = Callable[..., Any]
# A batch body: `fn(ctx, payloads)`, one result per payload, never None (see `run_batch`).
BatchBody = Callable[[TaskContext, list[Payload]], list[Any]]
BATCH_STRATEGY = "workers.messaging.batching:strategy"

# Headers of a deferred task's message: when it first deferred (epoch seconds) and how often.
DEFERRED_SINCE = "backstop_deferred_since"
DEFERRALS = "backstop_deferrals"


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def header_int(headers: dict[str, Any], name: str) -> int | None:
    value = headers.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def count_process_deaths(task_id: str | None) -> int | None:
    """Count one more death of a process running task `task_id`, in the broker's Redis where
    every worker sees it; the count so far, or None where it cannot be kept (the embedded
    broker, or Redis unreachable: the task is then put back as Celery does)."""
    client = broker_redis(get_settings())
    if client is None or not task_id:
        return None
    key = f"backstop:process-deaths:{task_id}"
    try:
        with client.pipeline() as pipe:
            deaths, _ = pipe.incr(key).expire(key, 7 * 86400).execute()
        return int(deaths)
    except redis.RedisError as error:
        log.warning("task.death_not_counted", extra={"error": one_line(error)})
        return None
    finally:
        client.close()


def defer_countdown(
    wait: float, deferrals: int, cap: float, rng: random.Random | None = None
) -> float:
    """How long a deferred task waits before it looks again: until its gateway's breaker may
    let calls through (`wait`), doubled for every deferral in a row, so an outage that lasts
    costs the broker less and less; up to a fifth more at random, so a backlog does not come
    back at one instant. At the `cap` the spread goes below it instead."""
    step = max(wait, 1.0) * 2 ** min(deferrals, 16)
    jitter = (rng or random).uniform(0, 0.2)
    return step * (1 + jitter) if step * 1.2 <= cap else cap * (1 - jitter)


def redacted_repr(kwargs: Any, redacted: frozenset[str]) -> str:
    """A payload's repr with the `redacted` fields shown only by their length."""
    if not isinstance(kwargs, dict):
        return f"<{type(kwargs).__name__}>"
    return repr({k: f"<{len(str(v))} chars>" if k in redacted else v for k, v in kwargs.items()})


class TaskRequest(Request):  # type: ignore[misc]
    """A message as the worker sees it, run under the worker's own time limits. For a payload
    with fields that must not be shown (a webhook's raw body and signature) the repr its sender
    put in the message, Celery's full repr by default, is replaced as the message arrives: it
    is what the worker logs, announces to Flower in `task-received`, and answers `celery
    inspect active|reserved` with (asked for the arguments themselves, it gives that repr
    too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The time limits are this worker's settings, whatever the message carries: Celery
        # copies a sender's own limits into the message (a CLI, beat or another worker with
        # other settings), and a longer one could outlast the visibility timeout.
        self.time_limits = (None, None)
        redacted = getattr(getattr(self._task, "payload_model", None), "REDACTED", None)
        self._redacted = bool(redacted)
        if redacted:
            given = self._args
            shown = len(given) if isinstance(given, list | tuple) else type(given).__name__
            self._argsrepr = f"<{shown} positional arguments>"
            self._kwargsrepr = redacted_repr(self._kwargs, redacted)
            # The task's own request (its failure and success log lines) is made from these.
            self._request_dict["argsrepr"] = self._argsrepr
            self._request_dict["kwargsrepr"] = self._kwargsrepr

    def info(self, safe: bool = False) -> dict[str, Any]:
        return super().info(safe=safe or self._redacted)  # type: ignore[no-any-return]

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        """Two failures the task never saw, reported here in the worker's main process:

        - The hard time limit: the pool killed the task's process, and Celery acks the message
          as failed (this call comes before `on_timeout`). The task is dead-lettered first; if
          even that fails, the message goes back to its queue instead of being acked.
        - The task's pool process died (`WorkerLostError`): Celery puts it back on its queue
          (`reject_on_worker_lost`). One that kills its process every time would come back
          for ever: after TASK_MAX_PROCESS_DEATHS deaths it is dead-lettered and acked.
        """
        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        if worker_state.should_terminate:
            pass  # the worker is shutting down: the task did nothing wrong
        elif isinstance(exc, TimeLimitExceeded):
            limit = exc.args[0] if exc.args else get_settings().TASK_TIME_LIMIT_SECONDS
            failure = TimeLimitExceeded(f"killed at the hard time limit of {limit}s")
            if not self.keep(failure):
                self.reject(requeue=True)
        elif isinstance(exc, WorkerLostError) and self._task.acks_late:
            deaths = count_process_deaths(self.id)
            limit = get_settings().TASK_MAX_PROCESS_DEATHS
            if deaths is not None and deaths >= limit:
                failure = TaskKillsItsProcess(
                    f"the worker process running it died {deaths} times "
                    f"(TASK_MAX_PROCESS_DEATHS={limit}): {one_line(exc)}"
                )
                if self.keep(failure):
                    self.acknowledge()  # Celery's own requeue of it is then a no-op
        super().on_failure(exc_info, send_failed_event, return_ok)

    def keep(self, failure: Exception) -> bool:
        """Dead-letter this message's task with `failure`; False if the letter could not be
        written (the caller then leaves the message to the broker)."""
        try:
            self._task.dead_letter(
                failure,
                task_id=self.id,
                args=self._args if isinstance(self._args, list | tuple) else (),
                kwargs=self._kwargs if isinstance(self._kwargs, dict) else {},
                headers=self._request_dict,
                attempts=int(self._request_dict.get("retries") or 0) + 1,
            )
        except Exception as error:
            log.error("dead_letter.write_failed", extra={"error": one_line(error)})
            return False
        return True


class BackstopTask(Task):  # type: ignore[misc]
    """The base of every backstop task. Set by the `task` decorator; not used directly."""

    # Whether a failed task runs again is `handle_error`'s decision alone (TASK_MAX_RETRIES).
    # Celery keeps a limit of its own, 3 by default: `retry()` re-raises the error at the
    # fourth retry, the message is acked as failed, and the task is gone with no dead letter.
    # None switches Celery's limit off; the `task` decorator refuses to set one.
    max_retries = None
    payload_model: type[Payload] | None = None
    body: Body
    batch_body: BatchBody | None = None
    precheck: dead_letters.Precheck | None = None
    batch_precheck: dead_letters.BatchPrecheck | None = None
    Request = TaskRequest

    def execute(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        request = self.request
        redacted = getattr(self.payload_model, "REDACTED", None)
        if redacted:
            # Celery logs a failed task's kwargsrepr (the sender's repr of the payload).
            request.kwargsrepr = redacted_repr(kwargs, redacted)
        try:
            payload = self.validate_payload(args, kwargs)
            with session_scope() as session:
                ctx = TaskContext(session, utcnow(), request.id, self.name, request.retries or 0)
                result = self.body(ctx) if payload is None else self.body(ctx, payload)
                letter = self.dead_letter_id()
                if letter is not None:  # a replay: its letter closes with the work
                    dead_letters.replay_succeeded(session, letter, request.id, utcnow())
                return result
        except Retry:
            raise
        except Defer as later:
            try:
                return self.defer(later, kwargs)
            except Exception as exc:  # deferred too long, or the broker refused the message
                self.handle_error(exc, args, kwargs)
                raise
        except Exception as exc:
            self.handle_error(exc, args, kwargs)
            raise

    def run_batch(self, items: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        """Many messages of this task, `(task id, kwargs)` each, in one transaction: the pool job
        of the batch strategy (workers/messaging/batching.py). Returns each message's result,
        or None for one left to the ordinary path, a task run of its own: a payload that does
        not validate, which the task then dead-letters as it would have anyway. An exception
        leaves every message to the ordinary path (the transaction rolled back)."""
        assert self.batch_body is not None, f"task {self.name} has no batch body"
        results: list[Any] = [None] * len(items)
        valid: list[tuple[int, Payload]] = []
        for position, (_, kwargs) in enumerate(items):
            try:
                payload = self.validate_payload((), kwargs)
            except PayloadError:
                continue
            if payload is not None:
                valid.append((position, payload))
        if valid:
            with session_scope() as session:
                ctx = TaskContext(session, utcnow(), None, self.name, 0)
                done = self.batch_body(ctx, [payload for _, payload in valid])
                # Before the commit: a wrong answer rolls the batch back, never runs it twice.
                for (position, _), result in zip(valid, done, strict=True):
                    results[position] = result
        return results

    def defer(self, later: Defer, kwargs: dict[str, Any]) -> str:
        """Send this task again once its work can start, spending no retry. The message
        carries when the task first deferred; past TASK_DEFER_MAX_SECONDS it raises
        `DeferredTooLong` instead, which dead-letters it."""
        settings = get_settings()
        headers = dict(self.request.headers or {})
        now = time.time()
        since, deferrals = headers.get(DEFERRED_SINCE), headers.get(DEFERRALS)
        if not is_number(since) or since > now:
            since = now
        if not isinstance(deferrals, int) or isinstance(deferrals, bool) or deferrals < 0:
            deferrals = 0
        waited = now - since
        if waited >= settings.TASK_DEFER_MAX_SECONDS:
            raise DeferredTooLong(
                f"deferred {deferrals} times over {waited:.0f}s, longer than "
                f"TASK_DEFER_MAX_SECONDS ({settings.TASK_DEFER_MAX_SECONDS}): {later}"
            )
        countdown = defer_countdown(later.seconds, deferrals, settings.max_countdown)
        log.info(
            "task.deferred",
            extra={"reason": str(later), "countdown": round(countdown), "deferrals": deferrals},
        )
        headers.update({DEFERRED_SINCE: since, DEFERRALS: deferrals + 1})
        send(self.name, dict(kwargs), countdown=countdown, headers=headers)
        letter = self.dead_letter_id()
        if letter is not None:  # a replay still waiting is not a replay that was lost
            try:
                with session_scope() as session:
                    dead_letters.replay_waiting(session, letter, utcnow())
            except Exception as error:  # the deferral is sent: never a second copy by a retry
                log.warning("dead_letter.not_marked_waiting", extra={"error": one_line(error)})
        return "deferred"

    def dead_letter_id(self) -> int | None:
        """The dead letter this run replays, from the message header `dlq.replay` sets."""
        return header_int(self.request.headers or {}, dead_letters.HEADER)

    def validate_payload(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Payload | None:
        if args:
            raise PayloadError(
                "invalid payload: positional arguments are not accepted; send keyword arguments"
            )
        if self.payload_model is None:
            if kwargs:
                raise PayloadError(f"invalid payload: unexpected fields {sorted(kwargs)}")
            return None
        return validate(self.payload_model, kwargs)

    def handle_error(self, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Retry a transient error, or dead-letter the task; returns only to re-raise `exc`."""
        settings = get_settings()
        retries = self.request.retries or 0
        if isinstance(exc, RetryRemaining):
            kwargs = exc.kwargs
        if retryable(exc) and retries < settings.TASK_MAX_RETRIES:
            countdown = self.retry_countdown(retries)
            log.warning(
                "task.retry",
                extra={
                    "error": type(exc).__name__,
                    "attempt": retries + 1,
                    "countdown": round(countdown, 1),
                },
            )
            self.schedule_retry(exc, kwargs, countdown)
        try:
            self.dead_letter(
                exc,
                task_id=self.request.id,
                args=args,
                kwargs=kwargs,
                headers=self.request.headers or {},
                attempts=retries + 1,
            )
        except Exception as write_error:
            # Losing the task is worse than trying again: without its dead letter, retry it;
            # failing that, hand the message back to the broker.
            log.error("dead_letter.write_failed", extra={"error": one_line(write_error)})
            self.schedule_retry(exc, kwargs, retry_cap(settings))
            raise Reject(write_error, requeue=True) from write_error

    def dead_letter(
        self,
        exc: BaseException,
        *,
        task_id: str | None,
        args: tuple[Any, ...] | list[Any],
        kwargs: dict[str, Any],
        headers: dict[str, Any],
        attempts: int,
    ) -> int:
        """Write the task's dead letter, or, for a replay, put its letter back to NEW with the
        new failure. Returns the letter's id."""
        kind = classify(exc)
        payload = dict(kwargs)
        if args:
            payload["__args__"] = list(args)
        replayed = header_int(headers, dead_letters.HEADER)
        failure: dict[str, Any] = {
            "task_id": task_id,
            "payload": payload,
            "error": exc,
            "attempts": attempts,
            "classification": kind,
            "now": utcnow(),
        }
        with session_scope() as session:
            letter = replayed and dead_letters.replay_failed(session, replayed, **failure)
            letter = letter or dead_letters.record_dead_letter(
                session, task_name=self.name, **failure
            )
        log.error(
            "task.dead_lettered",
            extra={
                "dead_letter_id": letter,
                "classification": kind.value,
                "error": f"{type(exc).__name__}: {one_line(exc)}",
            },
        )
        return letter

    def schedule_retry(self, exc: Exception, kwargs: dict[str, Any], countdown: float) -> None:
        """Send this task again in `countdown` seconds and end this run (raises `Retry`).
        Returns only when the broker refused the new message: Celery would then reject the
        one in hand without requeueing it, so the caller must keep the task some other way."""
        try:
            raise self.retry(exc=exc, kwargs=kwargs, countdown=countdown)
        except Reject as refused:
            log.error("task.retry_not_sent", extra={"error": one_line(refused.reason)})

    @staticmethod
    def retry_countdown(retries: int) -> float:
        settings = get_settings()
        return backoff_delay(retries, settings.TASK_RETRY_BASE_SECONDS, retry_cap(settings))


def retry_cap(settings: Settings) -> float:
    """The longest wait before a retry: TASK_RETRY_MAX_SECONDS, inside the longest countdown."""
    return min(settings.TASK_RETRY_MAX_SECONDS, settings.max_countdown)


# Celery's per-task retry options. Any of them would make Celery decide, beside `handle_error`,
# whether a task runs again: `max_retries` would bring back the limit that lost tasks.
RETRY_OPTIONS = frozenset(
    {
        "max_retries",
        "autoretry_for",
        "retry_kwargs",
        "retry_backoff",
        "retry_backoff_max",
        "retry_jitter",
        "default_retry_delay",
    }
)


def task(
    name: str,
    *,
    payload: type[Payload] | None = None,
    precheck: dead_letters.Precheck | None = None,
    batch_precheck: dead_letters.BatchPrecheck | None = None,
    batch: BatchBody | None = None,
    **options: Any,
) -> Callable[[Body], BackstopTask]:
    """Declare a task under its explicit, stable, dotted contract name.

    The body is `fn(ctx)` or `fn(ctx, payload)`; it should be a thin call into a plain function
    of `workers/` that tests call directly. `precheck(session, payload, actor)` (or its batch
    form, one answer per payload) says why replaying a dead letter of this task is unnecessary
    (the refund already COMPLETED), or None to replay it.

    `batch(ctx, payloads)`, the same work for many payloads in one transaction, makes the
    worker receive this task in batches (workers/messaging/batching.py): one pool job and one
    commit for the messages that arrive while a batch runs. The body stays what runs a message
    on its own: a replay, a payload that does not validate, a batch that failed.
    """

    owned = RETRY_OPTIONS.intersection(options)
    if owned:
        raise TypeError(
            f"task {name}: {sorted(owned)} would take the retry decision from BackstopTask; "
            "retries are TASK_MAX_RETRIES with backoff, for every task"
        )

    if batch is not None:
        options.update(batch_body=staticmethod(batch), Strategy=BATCH_STRATEGY)

    def decorate(fn: Body) -> BackstopTask:
        def run(self: BackstopTask, *args: Any, **kwargs: Any) -> Any:
            return self.execute(args, kwargs)

        run.__name__, run.__doc__, run.__module__ = fn.__name__, fn.__doc__, fn.__module__
        return shared_task(  # type: ignore[no-any-return]
            name=name,
            base=BackstopTask,
            bind=True,
            payload_model=payload,
            body=staticmethod(fn),
            precheck=staticmethod(precheck) if precheck else None,
            batch_precheck=staticmethod(batch_precheck) if batch_precheck else None,
            **options,
        )(run)

    return decorate
