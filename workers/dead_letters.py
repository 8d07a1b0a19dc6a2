"""Dead letters as every task writes them: the row for a task that cannot succeed, and what a
replayed task reports back about the letter it replays. The base task, the consumer and the
domains that dead-letter their own work (refunds, notifications) share it; triage and
replay, the operators' side, live in `workers.dlq`."""

from __future__ import annotations

import logging
import math
import traceback as tb
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from workers.db import transition
from workers.db.transitions import InvalidTransition
from workers.errors import Classification, PermanentError, one_line
from workers.models import DeadLetter, DeadLetterEvent

log = logging.getLogger("backstop.dlq")

# The message header that ties a replayed task to its dead letter.
HEADER = "backstop_dead_letter_id"

# Before a dead letter is replayed, the task's precheck looks at the rows the payload names, in
# the replay's own transaction: it returns why the replay is unnecessary (the refund is already
# COMPLETED, the hold already final), or None to replay. It may also prepare the rows for the
# replay (a DEAD notification back to PENDING), audited, in that same transaction.
Precheck = Callable[[Session, dict[str, Any], str], str | None]
# The same for many letters of one task at once (triage replays thousands): one query, not one
# per letter. Returns one answer per payload, in order.
BatchPrecheck = Callable[[Session, list[dict[str, Any]], str], list[str | None]]


def record_dead_letter(
    session: Session,
    *,
    task_name: str,
    task_id: str | None,
    payload: dict[str, Any],
    error: BaseException,
    attempts: int,
    classification: Classification,
    now: datetime,
) -> int:
    """Write one `dead_letters` row for a task that cannot succeed; returns its id."""
    return int(
        session.execute(
            insert(DeadLetter)
            .values(
                task_name=task_name,
                task_id=task_id,
                payload=storable(payload),
                error_type=type(error).__name__,
                error_message=storable(one_line(error)[:4000]),
                traceback=storable("".join(tb.format_exception(error))[-20000:]),
                attempts=attempts,
                classification=classification.value,
                status="NEW",
                created_at=now,
                updated_at=now,
            )
            .returning(DeadLetter.id)
        ).scalar_one()
    )


def storable(value: Any) -> Any:
    """`value` as Postgres can keep it: text and jsonb refuse NUL characters and unpaired
    surrogates, jsonb refuses NaN and infinities. A payload that carries them (a fuzzed or
    corrupt message) must still get its dead letter: they are kept as escapes and strings."""
    if isinstance(value, str):
        # Unpaired surrogates (valid JSON escapes, invalid UTF-8) are kept as their escapes.
        text = value.encode("utf-8", "backslashreplace").decode("utf-8")
        return text.replace("\x00", "\\u0000")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {storable(key): storable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [storable(item) for item in value]
    return value


def add_events(session: Session, events: list[dict[str, Any]]) -> None:
    if events:
        session.execute(insert(DeadLetterEvent), events)


def event(
    letter_id: int, action: str, actor: str, reason: str | None, now: datetime, **detail: Any
) -> dict[str, Any]:
    return {
        "dead_letter_id": letter_id,
        "action": action,
        "actor": actor[:128],
        "reason": reason,
        "detail": detail,
        "at": now,
    }


# -- the replayed task reports back (called by the base task) -----------------------------------


def replay_succeeded(session: Session, letter_id: int, task_id: str | None, now: datetime) -> None:
    """In the replayed task's own transaction: the letter is done."""
    try:
        moved = transition(
            session,
            "dead_letters",
            letter_id,
            "REPLAYED",
            actor="worker",
            reason=f"the replay succeeded (task {task_id})",
            now=now,
        )
    except (InvalidTransition, PermanentError) as exc:  # discarded meanwhile, or gone
        log.warning(
            "dead_letter.replay_unexpected",
            extra={"dead_letter_id": letter_id, "error": one_line(exc)},
        )
        return
    if moved.changed:
        add_events(
            session, [event(letter_id, "replay_succeeded", "worker", None, now, task_id=task_id)]
        )


def replay_waiting(session: Session, letter_id: int, now: datetime) -> None:
    """A replay that deferred (its gateway's breaker is open) is alive, not lost: its
    `last_replayed_at` moves on, so triage does not give it up as stale while it waits (it
    may wait up to TASK_DEFER_MAX_SECONDS, longer than DLQ_REPLAY_STALE_SECONDS)."""
    session.execute(
        update(DeadLetter)
        .where(DeadLetter.id == letter_id, DeadLetter.status == "RETRYING")
        .values(last_replayed_at=now)
    )


def replay_failed(
    session: Session,
    letter_id: int,
    *,
    task_id: str | None,
    payload: dict[str, Any],
    error: BaseException,
    attempts: int,
    classification: Classification,
    now: datetime,
) -> int | None:
    """The replay failed for good: the same letter takes the new failure and goes back to NEW
    for triage. Returns its id, or None when the letter is no longer RETRYING (the caller then
    writes a new letter)."""
    status = session.execute(
        select(DeadLetter.status).where(DeadLetter.id == letter_id).with_for_update()
    ).scalar_one_or_none()
    if status != "RETRYING":
        return None
    session.execute(
        update(DeadLetter)
        .where(DeadLetter.id == letter_id)
        .values(
            task_id=task_id,
            payload=storable(payload),
            error_type=type(error).__name__,
            error_message=storable(one_line(error)[:4000]),
            traceback=storable("".join(tb.format_exception(error))[-20000:]),
            attempts=DeadLetter.attempts + attempts,
            classification=classification.value,
        )
    )
    transition(
        session,
        "dead_letters",
        letter_id,
        "NEW",
        actor="worker",
        reason=f"the replay failed again: {type(error).__name__}",
        now=now,
    )
    add_events(
        session,
        [event(letter_id, "replay_failed", "worker", one_line(error)[:500], now, task_id=task_id)],
    )
    return letter_id
