"""Named lock helpers: rows locked in a fixed order, batches claimed with SKIP LOCKED.

On SQLite there are no row locks; every write transaction there begins IMMEDIATE and so holds
the database's write lock, which makes the same code correct, only serial.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

T = TypeVar("T")


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def lock_rows(session: Session, model: type[T], ids: Iterable[int]) -> Sequence[T]:
    """Lock these rows FOR UPDATE, always in id order, so two lockers never deadlock."""
    table = model.__table__  # type: ignore[attr-defined]
    stmt = (
        select(model)
        .where(table.c.id.in_(sorted(set(ids))))
        .order_by(table.c.id)
        .with_for_update(of=table)
    )
    return session.scalars(stmt).all()


def claim(stmt: Select[Any], limit: int) -> Select[Any]:
    """Turn a selection of due rows into a batch claim: `LIMIT n FOR UPDATE SKIP LOCKED`.

    Rows another transaction holds are skipped, not waited for, so concurrent sweeps split the
    work between them instead of queueing behind each other.
    """
    froms = stmt.get_final_froms()
    return stmt.limit(limit).with_for_update(skip_locked=True, of=froms[0] if froms else None)


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for a name."""
    value = zlib.crc32(name.encode()) | (zlib.adler32(name.encode()) << 32)
    return value - (1 << 64) if value >= (1 << 63) else value


def try_advisory_xact_lock(session: Session, name: str) -> bool:
    """Take the named lock until the transaction ends, or return False if someone holds it."""
    if not is_postgres(session):
        return True  # the SQLite write lock taken at BEGIN IMMEDIATE already serializes
    return bool(session.execute(select(func.pg_try_advisory_xact_lock(lock_key(name)))).scalar())
