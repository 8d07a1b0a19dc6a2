"""The dead-letter table: where every task's terminal failure is kept, payload and all."""

from __future__ import annotations

import math
import traceback as tb
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from workers.errors import Classification, one_line
from workers.models import DeadLetter


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


# -- replay preconditions ------------------------------------------------------------------------

# Before a dead letter is replayed, the task's precheck looks at the rows the payload names, in
# the replay's own transaction: it returns why the replay is unnecessary (the refund is already
# COMPLETED, the hold already final), or None to replay. It may also prepare the rows for the
# replay (a DEAD notification back to PENDING), audited, in that same transaction.
Precheck = Callable[[Session, dict[str, Any], str], str | None]

PRECHECKS: dict[str, Precheck] = {}


def precheck(task_name: str) -> Callable[[Precheck], Precheck]:
    """Register `fn(session, payload, actor) -> reason_unnecessary | None` for `task_name`."""

    def register(fn: Precheck) -> Precheck:
        PRECHECKS[task_name] = fn
        return fn

    return register
