"""Messages of one task run together: one pool job and one transaction for many messages.

A task declared with a batch body (`notifications.send`) is received with this strategy.
Celery's default strategy still takes each message: revocation, the `task-received` event, the
reserved state; a message with a countdown or ETA, or held by a rate limit, runs as a task of
its own when due, as always. Only where a ready request then goes differs: instead of one pool
job per message, requests wait here while a batch of the task runs and go to the pool together
when it is done, up to TASK_BATCH_MAX at a time, or at once when no batch runs (a lone message
waits for nothing, a burst fills the next batch). A batch is one pool job,
`BackstopTask.run_batch`: every payload validated, the batch body run in one transaction. Each
request is then settled as Celery settles a task of its own: started and succeeded (events,
worker state, Flower), and acked after the commit.

What a batch does not finish goes the ordinary way, one pool job per message, whose task
retries or dead-letters it as always:

- a payload that does not validate (the task dead-letters it, naming the field);
- a replay of a dead letter (its letter must close with the work) and a message with
  positional arguments;
- every request of a batch that raised, hit its time limit or lost its pool process. A batch
  that raised rolled back; one whose process died after its commit may write a notification
  sent without a dedupe key a second time, as a redelivery of a single task would.

Requests held here do not count against the worker's prefetch (as a countdown's do not): the
consumer takes more messages while a batch runs, up to `HELD` batches' worth per task. On a
lost broker connection the requests waiting, and the batches no pool process has taken, are
forgotten here: the consumer puts their messages back (workers/messaging/consumer.py).
TASK_BATCH_MAX=1 turns batching off: every message is a task run of its own.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import current_app
from celery.worker.strategy import default

from config import get_settings
from workers import dead_letters
from workers.messaging import redis_transport
from workers.observability import metrics

log = logging.getLogger("backstop.batching")

HELD = 4  # batches' worth of requests held (waiting or running) beyond the prefetch


class _Consumer:
    """The consumer as Celery's default strategy sees it, but for where a request goes."""

    def __init__(self, consumer: Any, on_task_request: Callable[[Any], Any]) -> None:
        self._consumer = consumer
        self.on_task_request = on_task_request

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


def strategy(task: Any, app: Any, consumer: Any, **options: Any) -> Callable[..., Any]:
    """The `Strategy` of a task with a batch body (`task(..., batch=...)`)."""
    batcher = Batcher(task, consumer)
    _batchers.append(batcher)
    return default(task, app, _Consumer(consumer, batcher.submit), **options)  # type: ignore[no-any-return]


@dataclass
class Batch:
    """Requests handed to the pool as one job; `accepted` once a pool process has taken it."""

    requests: list[Any]
    accepted: tuple[int, float] | None = None


class Batcher:
    """One task's requests in one consumer, from the strategy to their batch's outcome. Runs in
    the consumer's thread only (the strategy and the pool's callbacks both run there)."""

    def __init__(self, task: Any, consumer: Any) -> None:
        self.task = task
        self.consumer = consumer
        self.ordinary = consumer.on_task_request  # one pool job for one request
        self.size = get_settings().TASK_BATCH_MAX
        # Batches run at once: half the pool, so that other tasks (the delivery pumps) run too.
        self.lanes = max(1, int(getattr(consumer.pool, "limit", 1) or 1) // 2)
        self.waiting: deque[Any] = deque()
        self.running: dict[int, Batch] = {}
        self.numbers = itertools.count(1)
        self.qos: Any = None  # the consumer's prefetch, made after the strategies
        self.credit = 0  # prefetch added for requests held here
        self.retired = False

    def submit(self, request: Any) -> None:
        if self.size == 1 or self.retired or not batchable(request):
            self.ordinary(request)
            return
        if self.qos is None:
            self.qos = self.consumer.qos
        if self.credit < HELD * self.size:
            self.qos.increment_eventually()
            self.credit += 1
            request._batch_credit = True
        self.waiting.append(request)
        if len(self.running) < self.lanes:
            self.flush()

    def flush(self) -> None:
        requests: list[Any] = []
        while self.waiting and len(requests) < self.size:
            request = self.waiting.popleft()
            if request.revoked():  # revoked while it waited: Celery has acked and announced it
                self.release(request)
                continue
            requests.append(request)
        if not requests:
            return
        number = next(self.numbers)
        batch = self.running[number] = Batch(requests)
        items = [(request.id, request.kwargs) for request in requests]

        def accepted(pid: int, at: float) -> None:
            batch.accepted = (pid, at)

        try:
            self.consumer.pool.apply_async(
                run_batch,
                args=(self.task.name, items),
                accept_callback=accepted,
                callback=lambda results: self.finished(number, results),
                error_callback=lambda failure: self.failed(number, failure),
                # billiard passes these two by name
                timeout_callback=lambda soft, timeout: self.timed_out(number, soft, timeout),
                correlation_id=requests[0].id,
            )
        except Exception as error:
            self.failed(number, error)

    def finished(self, number: int, results: Any) -> None:
        batch = self.running.pop(number, None)
        if batch is None:
            return
        if not isinstance(results, list) or len(results) != len(batch.requests):
            self.unbatch(batch.requests, f"the batch answered {type(results).__name__}")
            return
        pid, at = batch.accepted or (0, time.monotonic())
        runtime = time.monotonic() - at
        try:
            done = zip(batch.requests, results, strict=True)
            ack_together([request for request, result in done if result is not None])
            for request, result in zip(batch.requests, results, strict=True):
                self.settle(request, result, pid, at, runtime)
        finally:
            self.next()

    def settle(self, request: Any, result: Any, pid: int, at: float, runtime: float) -> None:
        """One request of a batch that committed: done, as a task of its own would be."""
        try:
            self.release(request)
            if result is None:  # left to the task itself (a payload that does not validate)
                self.ordinary(request)
                return
            # Revoked with terminate while its batch ran: it is done already, and the process
            # that ran it runs something else now.
            request._terminate_on_ack = None
            request.on_accepted(pid, at)
            request.on_success((False, result, runtime))
        except Exception as error:
            log.error(
                "batch.settle_failed",
                extra={"task": self.task.name, "task_id": request.id, "error": str(error)[:300]},
            )

    def failed(self, number: int, failure: Any) -> None:
        batch = self.running.pop(number, None)
        if batch is not None:
            self.unbatch(batch.requests, getattr(failure, "exception", failure))

    def timed_out(self, number: int, soft: bool, timeout: float) -> None:
        if not soft:  # the pool kills the process; the requests run again one by one
            self.failed(number, f"hard time limit ({timeout}s) exceeded")

    def unbatch(self, requests: list[Any], why: Any) -> None:
        """Every request of a batch that did not finish goes the ordinary way."""
        log.warning(
            "batch.unbatched",
            extra={"task": self.task.name, "requests": len(requests), "error": str(why)[:300]},
        )
        try:
            for request in requests:
                try:
                    self.release(request)
                    self.ordinary(request)
                except Exception as error:
                    log.error(
                        "batch.unbatch_failed",
                        extra={"task_id": request.id, "error": str(error)[:300]},
                    )
        finally:
            self.next()

    def next(self) -> None:
        if not self.retired and self.waiting and len(self.running) < self.lanes:
            self.flush()

    def release(self, request: Any) -> None:
        if getattr(request, "_batch_credit", False):
            request._batch_credit = False
            self.credit -= 1
            if not self.retired:
                self.qos.decrement_eventually()

    def retire(self) -> None:
        """The connection the requests came on is lost. The consumer puts back the messages
        not running: those waiting here, and those of a batch no pool process has taken (the
        pool drops such a job on a lost connection, and calls none of its callbacks), so both
        are forgotten here. Batches a process runs still settle; the new connection's prefetch
        is not this one's to change."""
        self.retired = True
        self.waiting.clear()
        for number, batch in list(self.running.items()):
            if batch.accepted is None:
                del self.running[number]


def ack_together(requests: list[Any]) -> None:
    """Ack the messages of a batch that committed in one round trip to Redis, instead of one
    each; the requests are then acknowledged (`Request.acknowledge` does nothing more). On
    another broker, or when the messages came on different channels, each request acks its
    own message as it is settled."""
    requests = [request for request in requests if not request.acknowledged]
    channels = {id(request.message.channel) for request in requests}
    if len(channels) != 1:
        return
    qos = getattr(requests[0].message.channel, "qos", None)
    if not isinstance(qos, redis_transport.QoS):
        return
    try:
        qos.ack_many([request.message.delivery_tag for request in requests])
    except Exception as error:  # Redis away: made again once connected (UNFINISHED_ACKS)
        log.error("batch.ack_failed", extra={"messages": len(requests), "error": str(error)[:300]})
    for request in requests:
        request.message._state = "ACK"
        request.acknowledged = True


def batchable(request: Any) -> bool:
    return (
        not request.args
        and isinstance(request.kwargs, dict)
        and dead_letters.HEADER not in (request.request_dict or {})
    )


_batchers: list[Batcher] = []


def forget_waiting() -> None:
    """On a lost connection: every batcher so far is retired (a new one comes with the
    strategies the reconnected consumer makes)."""
    for batcher in _batchers:
        batcher.retire()
    _batchers[:] = [batcher for batcher in _batchers if batcher.running]


def running_ids() -> set[str]:
    """The task ids in batches a pool process runs: they are acked when their batch ends."""
    return {
        request.id
        for batcher in _batchers
        for batch in batcher.running.values()
        for request in batch.requests
    }


def run_batch(task_name: str, items: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """The pool job of one batch."""
    started = time.perf_counter()
    results: list[Any] = current_app.tasks[task_name].run_batch(items)
    try:  # the batch has committed: nothing here may make it run again
        done = sum(result is not None for result in results)
        metrics.record_batch(task_name, done, time.perf_counter() - started)
    except Exception as error:
        log.warning("batch.metrics_failed", extra={"error": str(error)[:300]})
    return results
