"""Task metrics for Prometheus, recorded from Celery signals in every worker process.

The prefork pool runs tasks in child processes, so the metrics are kept in prometheus_client's
multiprocess mode: each process writes its own files, and `backstop metrics` adds them up. Each
worker node (`worker@host`, `batch@host`) gets its own subdirectory of PROMETHEUS_MULTIPROC_DIR,
emptied when the node starts and locked (flock) while it runs, so two nodes never clean each
other's files and the exporter reads only nodes that are alive.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from celery import signals
from prometheus_client import Counter, Gauge, Histogram, multiprocess, values
from prometheus_client.metrics_core import Metric

from config import get_settings

log = logging.getLogger("backstop.metrics")

LOCK_FILE = ".node.lock"

# Label values are task names (a fixed set, from the code), outcomes, and exception class
# names: never ids, payloads or messages.
TASKS = Counter(
    "backstop_tasks",
    "Task runs, by task and outcome (success, deferred, retry, failure, expired, revoked).",
    ["task", "outcome"],
)
DURATION = Histogram(
    "backstop_task_duration_seconds",
    "Wall time of one task run, by task and outcome.",
    ["task", "outcome"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800),
)
RETRIES = Counter(
    "backstop_task_retries",
    "Retries scheduled, by task and the class name of the error that caused them.",
    ["task", "reason"],
)
IN_PROGRESS = Gauge(
    "backstop_tasks_in_progress",
    "Tasks running now, by task.",
    ["task"],
    multiprocess_mode="livesum",
)
BATCH_SIZE = Histogram(
    "backstop_task_batch_size",
    "Messages one batch of a batched task (notifications.send) ran together, by task.",
    ["task"],
    buckets=(1, 2, 5, 10, 20, 50, 100),
)
REJECTED = Counter(
    "backstop_rejected_messages",
    "Messages a worker dropped: a task name it does not know, or a message it cannot decode.",
    ["reason"],
)

# The outcomes and reasons the alert rules count (deploy/prometheus/alerts.yml) exist at 0 from
# the worker's start: a counter that first appeared with its first failure would have no earlier
# sample, and increase() would not see that failure.
ALERTED_OUTCOMES = ("failure", "expired")
REJECT_REASONS = ("unknown_task", "undecodable")

_started: dict[str, float] = {}


def initialize(task_names: Iterable[str]) -> None:
    for name in task_names:
        for outcome in ALERTED_OUTCOMES:
            TASKS.labels(name, outcome)
    for reason in REJECT_REASONS:
        REJECTED.labels(reason)


def outcome_of(state: str | None, retval: Any) -> str:
    if state == "SUCCESS":
        # BackstopTask returns exactly this when it re-sent the task for later (Defer).
        return "deferred" if retval == "deferred" else "success"
    return (state or "unknown").lower()


def on_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task is None:
        return
    _started[task_id or ""] = time.perf_counter()
    IN_PROGRESS.labels(task.name).inc()


def on_postrun(
    task_id: str | None = None,
    task: Any = None,
    retval: Any = None,
    state: str | None = None,
    **_: Any,
) -> None:
    if task is None:
        return
    started = _started.pop(task_id or "", None)
    outcome = outcome_of(state, retval)
    TASKS.labels(task.name, outcome).inc()
    if started is not None:
        DURATION.labels(task.name, outcome).observe(time.perf_counter() - started)
        IN_PROGRESS.labels(task.name).dec()


def record_batch(task_name: str, done: int, seconds: float) -> None:
    """A batch ran `done` messages of `task_name` in one job: each counts as a successful run,
    timed at its share of the batch (the messages it left to the ordinary path count there)."""
    if done:
        BATCH_SIZE.labels(task_name).observe(done)
        TASKS.labels(task_name, "success").inc(done)
        for _ in range(done):
            DURATION.labels(task_name, "success").observe(seconds / done)


def on_retry(sender: Any = None, reason: Any = None, **_: Any) -> None:
    # `reason` is celery's Retry, whose `exc` is the error that made the task retry.
    error = getattr(reason, "exc", None) or reason
    RETRIES.labels(getattr(sender, "name", "unknown"), type(error).__name__).inc()


def on_revoked(sender: Any = None, expired: bool = False, **_: Any) -> None:
    TASKS.labels(getattr(sender, "name", "unknown"), "expired" if expired else "revoked").inc()


def on_unknown(**_: Any) -> None:
    REJECTED.labels("unknown_task").inc()


def on_rejected(**_: Any) -> None:
    REJECTED.labels("undecodable").inc()


# The node's lock file, held open (and so locked) for as long as the worker runs.
_node_lock: int | None = None


def node_dir(root: Path, nodename: str) -> Path:
    return root / re.sub(r"[^A-Za-z0-9@._-]", "_", nodename)


def start_node(root: Path, nodename: str) -> Path:
    """Before the pool forks: lock this node's directory, empty it of a previous run's files,
    and point this process and its future children at it."""
    global _node_lock
    node = node_dir(root, nodename)
    node.mkdir(parents=True, exist_ok=True)
    fd = os.open(node / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    if _lock(fd, attempts=20):
        for stale in node.glob("*.db"):
            stale.unlink(missing_ok=True)
        _node_lock = fd
    else:
        os.close(fd)
        log.warning("metrics.node_in_use", extra={"node": nodename, "dir": str(node)})
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(node)
    # prometheus_client chose its value class when it was imported; choose again now that
    # the directory is set (no metric has a value yet: every one has labels).
    values.ValueClass = values.get_value_class()
    return node


def _lock(fd: int, attempts: int) -> bool:
    # The exporter takes the lock for an instant to see whether a node is alive: try again.
    for _ in range(attempts):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.05)
    return False


def prune_dead_processes(node: Path) -> None:
    """Drop the live gauges of pool processes that died without saying so (killed): a new
    pool process does it when it starts, which is when a dead one is replaced."""
    for path in node.glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            multiprocess.mark_process_dead(int(pid), str(node))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_nodes(root: Path) -> list[Path]:
    """The node directories whose worker is running (their lock is held)."""
    live = []
    for lock_path in sorted(root.glob(f"*/{LOCK_FILE}")):
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            live.append(lock_path.parent)
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    return live


class WorkerMetrics:
    """A collector for `backstop metrics`: the task metrics of every live worker node, added
    up across their processes."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def collect(self) -> Iterable[Metric]:
        for _ in range(3):
            files = [f for node in live_nodes(self.root) for f in _files(node)]
            try:
                return list(multiprocess.MultiProcessCollector.merge(files, accumulate=True))
            except FileNotFoundError:
                continue  # a node restarted and emptied its directory meanwhile
        return []


def _files(node: Path) -> Iterator[str]:
    yield from glob.glob(os.path.join(node, "*.db"))


def install() -> None:
    """Connect the signals that record task metrics and set up each worker node."""

    def start(sender: Any = None, **_: Any) -> None:
        node = start_node(Path(get_settings().PROMETHEUS_MULTIPROC_DIR), str(sender or "worker"))
        log.info("metrics.started", extra={"dir": str(node)})

    def tasks_known(sender: Any = None, **_: Any) -> None:
        # worker_init: the node's directory is set up and the worker's tasks are imported.
        initialize(name for name in sender.app.tasks if not name.startswith("celery."))

    def process_started(**_: Any) -> None:
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if folder:
            prune_dead_processes(Path(folder))

    def process_stopping(**_: Any) -> None:
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if folder:
            with contextlib.suppress(OSError):
                multiprocess.mark_process_dead(os.getpid(), folder)

    signals.celeryd_init.connect(start, weak=False)
    signals.worker_init.connect(tasks_known, weak=False)
    signals.worker_process_init.connect(process_started, weak=False)
    signals.worker_process_shutdown.connect(process_stopping, weak=False)
    signals.task_prerun.connect(on_prerun)
    signals.task_postrun.connect(on_postrun)
    signals.task_retry.connect(on_retry)
    signals.task_revoked.connect(on_revoked)
    signals.task_unknown.connect(on_unknown)
    signals.task_rejected.connect(on_rejected)
