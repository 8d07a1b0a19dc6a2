"""The gauges an on-call engineer pages on, computed from the database and the broker each time
Prometheus scrapes `backstop metrics` (queries, not counters kept by some process), and the
exporter that serves them beside the workers' task metrics.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from kombu import Connection
from kombu.exceptions import ChannelError
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from config import Settings
from config.celery import QUEUES, broker_transport_options
from config.schedule import schedule_windows
from workers.base import utcnow
from workers.db import session_scope
from workers.errors import one_line
from workers.gateways.registry import breaker_states
from workers.jobs import first_seen
from workers.models import CLASSIFICATIONS, BookingHold, DeadLetter, JobRun, Payment, Refund
from workers.observability.metrics import WorkerMetrics

log = logging.getLogger("backstop.metrics")

OPEN_DEAD_LETTERS = ("NEW", "RETRYING", "MANUAL_REVIEW")
GATEWAYS = ("razorpay", "stripe")
BREAKER_STATES = ("closed", "half-open", "open", "unknown")


class BusinessMetrics:
    """A Prometheus collector over backstop's tables and broker. Each source that cannot be
    read reports `backstop_metrics_source_up{source} 0` and leaves its gauges out."""

    def __init__(
        self,
        settings: Settings,
        *,
        sessions: Callable[[], AbstractContextManager[Session]] = session_scope,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings, self.sessions, self.clock = settings, sessions, clock

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "backstop_metrics_source_up",
            "1 if the source of the business gauges could be read in this scrape.",
            labels=["source"],
        )
        families: list[Metric] = []
        for source, read in (
            ("database", self.database),
            ("broker", self.broker),
            ("breakers", self.breakers),
        ):
            try:
                found = list(read())
            except Exception as exc:
                log.warning("metrics.source_failed", extra={"source": source, "error": _err(exc)})
                up.add_metric([source], 0)
            else:
                families += found
                up.add_metric([source], 1)
        return [*families, up]

    def database(self) -> Iterator[Metric]:
        now = self.clock()
        with self.sessions() as session:
            yield from dead_letters(session, now)
            yield from refunds(
                session, now, timedelta(seconds=self.settings.REFUND_STUCK_AFTER_SECONDS)
            )
            yield from holds(session, now)
            yield from jobs(session, now, schedule_windows(self.settings))

    def broker(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "backstop_queue_depth",
            "Messages waiting in each queue (Redis: LLEN of the queue and its priority lists).",
            labels=["queue"],
        )
        options = {
            **broker_transport_options(self.settings),
            # One attempt: a scrape reports the broker down rather than wait for it.
            "max_retries": 0,
            "socket_timeout": 5,
            "socket_connect_timeout": 5,
        }
        with Connection(
            self.settings.BROKER_URL, transport_options=options, connect_timeout=5
        ) as connection:
            connection.ensure_connection(max_retries=0, timeout=5)
            channel = connection.default_channel
            for queue in QUEUES:
                try:
                    count = channel.queue_declare(queue=queue, passive=True).message_count
                except ChannelError:  # Redis: no list yet, so nothing waiting
                    count = 0
                depth.add_metric([queue], count)
            yield depth
            if self.settings.broker_is_redis:
                unacked = GaugeMetricFamily(
                    "backstop_broker_unacked_messages",
                    "Messages workers have taken but not yet acknowledged: running, prefetched, "
                    "or waiting for a retry countdown.",
                )
                unacked.add_metric([], channel.client.hlen(channel.unacked_key))
                yield unacked

    def breakers(self) -> Iterator[Metric]:
        # Without Redis each process has its own breakers, and this one's say nothing.
        if not self.settings.broker_is_redis:
            return
        family = GaugeMetricFamily(
            "backstop_circuit_breaker_state",
            "1 for the current state of each configured gateway's circuit breaker.",
            labels=["gateway", "state"],
        )
        for gateway, state in breaker_states().items():
            if state == "not configured":
                continue
            current = state if state in BREAKER_STATES else "unknown"
            for name in BREAKER_STATES:
                family.add_metric([gateway, name], 1 if name == current else 0)
        yield family


def dead_letters(session: Session, now: datetime) -> Iterator[Metric]:
    rows = session.execute(
        select(
            DeadLetter.classification,
            DeadLetter.status,
            func.count(),
            func.min(DeadLetter.created_at),
        )
        .where(DeadLetter.status.in_(OPEN_DEAD_LETTERS))
        .group_by(DeadLetter.classification, DeadLetter.status)
    ).all()
    counts = {(c, s): 0 for c in CLASSIFICATIONS for s in OPEN_DEAD_LETTERS}
    oldest: dict[str, datetime] = {}
    for classification, status, count, first in rows:
        counts[(classification, status)] = count
        if first is not None and (status not in oldest or first < oldest[status]):
            oldest[status] = first
    family = GaugeMetricFamily(
        "backstop_dead_letters",
        "Open dead letters (NEW, RETRYING, MANUAL_REVIEW), by classification and status.",
        labels=["classification", "status"],
    )
    for (classification, status), count in sorted(counts.items()):
        family.add_metric([classification, status], count)
    yield family
    age = GaugeMetricFamily(
        "backstop_dead_letters_oldest_age_seconds",
        "Age of the oldest open dead letter in each status; 0 when there is none.",
        labels=["status"],
    )
    for status in OPEN_DEAD_LETTERS:
        first = oldest.get(status)
        age.add_metric([status], _seconds(now - first) if first else 0)
    yield age


def refunds(session: Session, now: datetime, stuck_after: timedelta) -> Iterator[Metric]:
    def by_gateway(where: Any) -> dict[str, int]:
        rows = session.execute(
            select(Payment.gateway, func.count())
            .select_from(Refund)
            .join(Payment, Payment.id == Refund.payment_id)
            .where(where)
            .group_by(Payment.gateway)
        ).all()
        return {gateway: count for gateway, count in rows}

    review = by_gateway(
        Refund.requires_manual_review.is_(True)
        & (Refund.status != "COMPLETED")
        & Refund.resolved_at.is_(None)
    )
    stuck = by_gateway((Refund.status == "PROCESSING") & (Refund.updated_at <= now - stuck_after))
    for name, text, counts in (
        (
            "backstop_refunds_manual_review",
            "Refunds flagged for manual review and not completed, by gateway.",
            review,
        ),
        (
            "backstop_refunds_stuck",
            "Refunds PROCESSING for longer than REFUND_STUCK_AFTER_SECONDS, by gateway.",
            stuck,
        ),
    ):
        family = GaugeMetricFamily(name, text, labels=["gateway"])
        for gateway in sorted(set(GATEWAYS) | set(counts)):
            family.add_metric([gateway], counts.get(gateway, 0))
        yield family


def holds(session: Session, now: datetime) -> Iterator[Metric]:
    count, first = session.execute(
        select(func.count(), func.min(BookingHold.expires_at)).where(
            BookingHold.status == "ACTIVE", BookingHold.expires_at <= now
        )
    ).one()
    overdue = GaugeMetricFamily(
        "backstop_holds_overdue", "ACTIVE holds past their expires_at, not yet expired."
    )
    overdue.add_metric([], count)
    yield overdue
    lag = GaugeMetricFamily(
        "backstop_hold_expiry_lag_seconds",
        "How long the oldest ACTIVE hold past its expires_at has been due; 0 when none is.",
    )
    lag.add_metric([], _seconds(now - first) if first else 0)
    yield lag


def jobs(session: Session, now: datetime, windows: dict[str, timedelta]) -> Iterator[Metric]:
    # The label is `job_name`, not `job`: Prometheus sets `job` on every series itself (the
    # scrape job), renames an exported `job` to `exported_job`, and rules matching on(job)
    # then meet every backstop job at once.
    rows = session.execute(
        select(JobRun.job_name, func.max(JobRun.finished_at))
        .where(JobRun.outcome == "OK")
        .group_by(JobRun.job_name)
    ).all()
    age = GaugeMetricFamily(
        "backstop_job_last_success_age_seconds",
        "Seconds since each scheduled job last finished a run with outcome OK (job_runs); "
        "absent for a job that never has.",
        labels=["job_name"],
    )
    for job, finished in sorted(rows):
        if finished is not None:
            age.add_metric([job], _seconds(now - finished))
    yield age
    window = GaugeMetricFamily(
        "backstop_job_window_seconds",
        "How long each scheduled job may go without a finished run before "
        "ops.check_schedules alerts.",
        labels=["job_name"],
    )
    for job, allowed in sorted(windows.items()):
        window.add_metric([job], allowed.total_seconds())
    yield window
    seen = GaugeMetricFamily(
        "backstop_job_first_seen_age_seconds",
        "Seconds since each scheduled job was first seen in the schedule (scheduled_jobs): a "
        "job that has never succeeded is late once this passes its window.",
        labels=["job_name"],
    )
    for job, first in sorted(first_seen(session).items()):
        seen.add_metric([job], _seconds(now - first))
    yield seen


def _seconds(delta: timedelta) -> float:
    return max(0.0, delta.total_seconds())


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {one_line(exc)}"[:200]


def registry(settings: Settings) -> CollectorRegistry:
    """The exporter's registry: every live worker node's task metrics and the business gauges."""
    found = CollectorRegistry()
    found.register(WorkerMetrics(Path(settings.PROMETHEUS_MULTIPROC_DIR)))
    found.register(BusinessMetrics(settings))
    return found


def serve(settings: Settings, host: str, port: int) -> None:
    """Serve /metrics until SIGTERM or Ctrl-C."""
    server, thread = start_http_server(port, addr=host, registry=registry(settings))
    log.info("metrics.serving", extra={"address": f"http://{host}:{port}/metrics"})
    signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
    try:
        while thread.is_alive():
            thread.join(1.0)
    except KeyboardInterrupt:
        server.shutdown()
