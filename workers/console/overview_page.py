"""The console's front page: what `backstop health` says, the queues, and three small charts
(dead letters opened and closed per hour, refund outcomes per day, hold-expiry lag), with a
link to Flower for task-level detail."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from flask import render_template
from sqlalchemy.orm import Session

from workers.base import utcnow
from workers.console.charts import bar_chart
from workers.console.views import backstop, bp
from workers.db import session_scope
from workers.observability import health
from workers.ops import overview
from workers.ops.overview import Series


@bp.get("/")
def index() -> Any:
    settings = backstop()["settings"]
    now = utcnow()
    # Independent reads, each on its own connection, at once: the page takes as long as the
    # slowest of them, not their sum.
    checks = READS.submit(health.run_checks, settings, now)
    letters = READS.submit(read, overview.letters_per_hour, now)
    refunds = READS.submit(read, overview.refund_outcomes_per_day, now)
    lag = READS.submit(read, overview.hold_expiry_lag, now)
    return render(settings, now, checks.result(), letters.result(), refunds.result(), lag.result())


READS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="overview")


def read(series: Callable[[Session, datetime], Series], now: datetime) -> Series:
    with session_scope() as db:
        return series(db, now)


def render(
    settings: Any,
    now: datetime,
    checks: list[health.Check],
    letters: Series,
    refunds: Series,
    lag: Series,
) -> Any:
    expired = int(sum(lag.lines["expired"]))
    charts = [
        bar_chart(
            "Dead letters opened and closed per hour, last 48 h",
            letters,
            {"opened": "#a4161a", "closed": "#2b8a3e"},
        ),
        bar_chart(
            "Refund outcomes per day, last 14 days",
            refunds,
            {"completed": "#2b8a3e", "failed": "#a4161a"},
            label="%b %d",
        ),
        bar_chart(
            f"Hold expiry: worst lag past expires_at (s) per 5 min, last hour ({expired} expired)",
            lag,
            {"worst_lag_s": "#1d5fbf"},
            label="%H:%M",
        ),
    ]
    return render_template(
        "overview.html",
        checks=checks,
        status=health.overall(checks),
        queues=overview.queue_depths(settings),
        charts=charts,
        now=now,
    )
