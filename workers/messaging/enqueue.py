"""Send tasks by name only once the transaction that asked for them has committed."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from config import get_settings
from workers.application import app
from workers.db import on_commit


def send(task_name: str, kwargs: dict[str, Any], **options: Any) -> None:
    """Send a task by its contract name now (outside any transaction). A countdown or ETA
    past `Settings.max_countdown` is refused: Redis would deliver the waiting message twice."""
    wait = options.get("countdown")
    if options.get("eta") is not None:
        wait = (options["eta"] - datetime.now(UTC)).total_seconds()
    if wait is not None and wait > get_settings().max_countdown:
        raise ValueError(
            f"{task_name}: a wait of {wait:.0f}s is longer than the longest countdown "
            f"({get_settings().max_countdown:g}s, half BROKER_VISIBILITY_TIMEOUT_SECONDS)"
        )
    options.setdefault("kwargsrepr", short_repr(kwargs))
    app.send_task(task_name, kwargs=kwargs, **options)


def short_repr(kwargs: dict[str, Any]) -> str:
    """What logs and Flower show of a payload: long lists (a sweep's 1,000 hold ids) are
    summarized, which also spares Celery building a full repr of them on every send."""
    shown = {
        key: f"<{len(value)} items>" if isinstance(value, list) and len(value) > 10 else value
        for key, value in kwargs.items()
    }
    return repr(shown)


def enqueue_after_commit(
    session: Session, task_name: str, kwargs: dict[str, Any], **options: Any
) -> None:
    """Send `task_name` once `session` commits; a rollback drops it, so no task ever refers to
    a row that was never written. A row that needs a task and lost it to a crash between commit
    and send is found again by its sweep."""
    on_commit(session, lambda: send(task_name, kwargs, **options))
