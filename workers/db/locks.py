"""Lock helpers: batches claimed with SKIP LOCKED.

On SQLite there are no row locks; every write transaction there begins IMMEDIATE and so holds
the database's write lock, which makes the same code correct, only serial.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

T = TypeVar("T")


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def claim(stmt: Select[Any], limit: int) -> Select[Any]:
    """Turn a selection of due rows into a batch claim: `LIMIT n FOR UPDATE SKIP LOCKED`.

    Rows another transaction holds are skipped, not waited for, so concurrent sweeps split the
    work between them instead of queueing behind each other.
    """
    froms = stmt.get_final_froms()
    return stmt.limit(limit).with_for_update(skip_locked=True, of=froms[0] if froms else None)
