"""Reading the dead-letter queue as operators do, for the CLI (`backstop dlq list|show`) and the
console alike: the filters, the counts grouped by task and error, a page of letters (newest
first, keyset-paged by id), and one letter with its whole history."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from workers.dlq.rules import glob_like
from workers.models import DeadLetter, DeadLetterEvent, StateTransition

DURATION = re.compile(r"^(\d+)([smhd])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(value: str) -> timedelta:
    """An age filter as operators write it (90s, 30m, 6h, 2d); ValueError names the value."""
    found = DURATION.match(value.strip())
    if not found:
        raise ValueError(f"{value!r} is not a duration like 90s, 30m, 6h or 2d")
    return timedelta(**{UNITS[found.group(2)]: int(found.group(1))})


def age(delta: timedelta) -> str:
    """An age as the lists show it: the largest whole unit (3d, 5h, 12m, 40s)."""
    seconds = max(int(delta.total_seconds()), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True)
class Filters:
    """Which letters: every field narrows (None or empty: no condition)."""

    task: str | None = None  # a task name; * and ? match
    statuses: tuple[str, ...] = ()
    error: str | None = None  # an exception class name, or text in the message
    classification: str | None = None
    rule: str | None = None
    older_than: timedelta | None = None
    newer_than: timedelta | None = None

    def select(self, now: datetime) -> Select[Any]:
        query = select(DeadLetter)
        if self.task:
            query = query.where(DeadLetter.task_name.like(glob_like(self.task), escape="\\"))
        if self.statuses:
            query = query.where(DeadLetter.status.in_(self.statuses))
        if self.error:
            query = query.where(
                (DeadLetter.error_type == self.error)
                | DeadLetter.error_message.contains(self.error)
            )
        if self.classification:
            query = query.where(DeadLetter.classification == self.classification)
        if self.rule:
            query = query.where(DeadLetter.rule == self.rule)
        if self.older_than is not None:
            query = query.where(DeadLetter.created_at <= now - self.older_than)
        if self.newer_than is not None:
            query = query.where(DeadLetter.created_at > now - self.newer_than)
        return query


@dataclass(frozen=True)
class Group:
    task_name: str
    error_type: str
    classification: str
    status: str
    count: int
    oldest: datetime


def groups_query(query: Select[Any]) -> Select[Any]:
    """The selected letters counted by task, error, classification and status, largest first."""
    chosen = query.subquery()
    return (
        select(
            chosen.c.task_name,
            chosen.c.error_type,
            chosen.c.classification,
            chosen.c.status,
            func.count(),
            func.min(chosen.c.created_at),
        )
        .group_by(chosen.c.task_name, chosen.c.error_type, chosen.c.classification, chosen.c.status)
        .order_by(func.count().desc())
    )


def groups(session: Session, query: Select[Any]) -> list[Group]:
    return [Group(*row) for row in session.execute(groups_query(query)).all()]


def page(
    session: Session, query: Select[Any], *, limit: int, before: int | None = None
) -> list[DeadLetter]:
    """Up to `limit` selected letters, newest first, from below id `before` (the next page
    starts below the last id shown: no OFFSET, however deep)."""
    if before is not None:
        query = query.where(DeadLetter.id < before)
    return list(session.scalars(query.order_by(DeadLetter.id.desc()).limit(limit)))


def history(session: Session, letter_id: int) -> list[dict[str, Any]]:
    """Everything that happened to a letter, oldest first: its status changes (who, when, why)
    and its events (the rule, an edit's diff, the replay's task id)."""
    moves = [
        {
            "at": row.at,
            "what": f"{row.from_status} -> {row.to_status}",
            "actor": row.actor,
            "reason": row.reason,
        }
        for row in session.scalars(
            select(StateTransition).where(
                StateTransition.entity == "dead_letters", StateTransition.entity_id == letter_id
            )
        )
    ]
    events = [
        {
            "at": row.at,
            "what": row.action,
            "actor": row.actor,
            "reason": row.reason,
            **({"detail": row.detail} if row.detail else {}),
        }
        for row in session.scalars(
            select(DeadLetterEvent).where(DeadLetterEvent.dead_letter_id == letter_id)
        )
    ]
    return sorted(moves + events, key=lambda item: item["at"])
