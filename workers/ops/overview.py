"""What the console's overview shows beside `backstop health`: the broker's queue depths, and
three series read from the audit trail and the tables: dead letters opened and closed per hour
over 48 hours, refund outcomes per day over 14 days, and how late holds were expired over the
last hour (five-minute buckets). Each is one grouped query on an index."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Integer, Select, cast, func, select
from sqlalchemy.orm import Session

from config import Settings
from config.celery import QUEUES
from workers.messaging.broker import broker_redis
from workers.models import BookingHold, DeadLetter, StateTransition


def queue_depths(settings: Settings) -> dict[str, int | None]:
    """Messages waiting in each queue (None: the broker did not answer, or is not Redis)."""
    client = broker_redis(settings, timeout=1.0)
    if client is None:
        return dict.fromkeys(QUEUES)
    try:
        with client.pipeline(transaction=False) as pipe:
            for queue in QUEUES:
                pipe.llen(queue)
            return dict(zip(QUEUES, pipe.execute(), strict=True))
    except Exception:
        return dict.fromkeys(QUEUES)
    finally:
        client.close()


def truncated(session: Session, unit: str, column: Any) -> ColumnElement[Any]:
    """`column` cut down to its hour or day (UTC), on Postgres or SQLite."""
    if session.get_bind().dialect.name == "postgresql":
        return func.date_trunc(unit, func.timezone("UTC", column))
    pattern = {"hour": "%Y-%m-%d %H:00:00", "day": "%Y-%m-%d 00:00:00"}[unit]
    return func.strftime(pattern, column)


def as_time(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=None)


@dataclass
class Series:
    """Points of one chart: `labels[i]` and one value per named line."""

    labels: list[datetime]
    lines: dict[str, list[float]]


def steps(start: datetime, count: int, step: timedelta) -> list[datetime]:
    return [start + step * i for i in range(count)]


def letters_per_hour(session: Session, now: datetime, hours: int = 48) -> Series:
    """Dead letters opened (created) and closed (REPLAYED or DISCARDED) in each of the last
    `hours` hours."""
    start = now.replace(minute=0, second=0, microsecond=0, tzinfo=None) - timedelta(hours=hours - 1)
    since = now - timedelta(hours=hours)
    hour = truncated(session, "hour", DeadLetter.created_at)
    opened = dict(
        session.execute(
            select(hour, func.count()).where(DeadLetter.created_at >= since).group_by(hour)
        ).all()
    )
    closed = dict(session.execute(letters_closed_query(session, since)).all())
    labels = steps(start, hours, timedelta(hours=1))
    opened_at = {as_time(k): v for k, v in opened.items()}
    closed_at = {as_time(k): v for k, v in closed.items()}
    return Series(
        labels,
        {
            "opened": [opened_at.get(t, 0) for t in labels],
            "closed": [closed_at.get(t, 0) for t in labels],
        },
    )


def letters_closed_query(session: Session, since: datetime) -> Select[Any]:
    """Dead letters closed (REPLAYED or DISCARDED) per hour since `since`, from the audit
    trail (on its (entity, at) index)."""
    hour = truncated(session, "hour", StateTransition.at)
    return (
        select(hour, func.count())
        .where(
            StateTransition.entity == "dead_letters",
            StateTransition.at >= since,
            StateTransition.to_status.in_(("REPLAYED", "DISCARDED")),
        )
        .group_by(hour)
    )


def refund_outcomes_per_day(session: Session, now: datetime, days: int = 14) -> Series:
    """Refunds COMPLETED and FAILED on each of the last `days` days (UTC)."""
    start = now.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None) - timedelta(
        days=days - 1
    )
    day = truncated(session, "day", StateTransition.at)
    rows = session.execute(
        select(day, StateTransition.to_status, func.count())
        .where(
            StateTransition.entity == "refunds",
            StateTransition.at >= now - timedelta(days=days),
            StateTransition.to_status.in_(("COMPLETED", "FAILED")),
            StateTransition.from_status != StateTransition.to_status,  # not a person's note
        )
        .group_by(day, StateTransition.to_status)
    ).all()
    found = {(as_time(at), status): count for at, status, count in rows}
    labels = steps(start, days, timedelta(days=1))
    return Series(
        labels,
        {
            "completed": [found.get((t, "COMPLETED"), 0) for t in labels],
            "failed": [found.get((t, "FAILED"), 0) for t in labels],
        },
    )


def hold_expiry_lag(session: Session, now: datetime, minutes: int = 60, step: int = 5) -> Series:
    """How late holds were expired over the last `minutes`: per `step`-minute bucket, the
    holds expired and the longest wait past their `expires_at`, in seconds (one grouped
    query)."""
    since = now - timedelta(minutes=minutes)
    width = step * 60
    if session.get_bind().dialect.name == "postgresql":
        offset = func.extract("epoch", StateTransition.at - since)
        lag = func.extract("epoch", StateTransition.at - BookingHold.expires_at)
        bucket = func.floor(offset / width)
    else:  # SQLite: days between two times, as seconds; a cast truncates (offsets are >= 0)
        offset = (func.julianday(StateTransition.at) - func.julianday(since)) * 86400
        lag = (func.julianday(StateTransition.at) - func.julianday(BookingHold.expires_at)) * 86400
        bucket = cast(offset / width, Integer)
    rows = session.execute(
        select(bucket, func.count(), func.max(lag))
        .join(BookingHold, BookingHold.id == StateTransition.entity_id)
        .where(
            StateTransition.entity == "booking_holds",
            StateTransition.to_status == "EXPIRED",
            StateTransition.at >= since,
        )
        .group_by(bucket)
    ).all()
    buckets = minutes // step
    counts = [0.0] * buckets
    worst = [0.0] * buckets
    for index, count, longest in rows:
        at = min(max(int(index), 0), buckets - 1)
        counts[at] += count
        worst[at] = max(worst[at], max(float(longest or 0), 0.0))
    labels = steps(since.replace(tzinfo=None), buckets, timedelta(minutes=step))
    return Series(labels, {"expired": counts, "worst_lag_s": worst})
