"""The dead-letter table: where every task's terminal failure is kept, payload and all."""

from __future__ import annotations

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
                payload=payload,
                error_type=type(error).__name__,
                error_message=one_line(error)[:4000],
                traceback="".join(tb.format_exception(error))[-20000:],
                attempts=attempts,
                classification=classification.value,
                status="NEW",
                created_at=now,
                updated_at=now,
            )
            .returning(DeadLetter.id)
        ).scalar_one()
    )


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
