"""The dead-letter table: where every task's terminal failure is kept, payload and all."""

from __future__ import annotations

import traceback as tb
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
