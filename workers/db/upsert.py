"""INSERT ... ON CONFLICT DO NOTHING on Postgres and SQLite alike."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def insert_ignore(
    session: Session,
    model: type[Any],
    rows: Sequence[dict[str, Any]] | dict[str, Any],
    *,
    conflict: Sequence[str],
    where: ColumnElement[bool] | None = None,
    returning: Any = None,
) -> list[Any]:
    """Insert rows, skipping any that collide on the unique index over `conflict` (with
    `where`, a partial index). Returns the `returning` column of the rows actually inserted."""
    dialect = session.get_bind().dialect.name
    module = postgresql if dialect == "postgresql" else sqlite
    stmt = module.insert(model).on_conflict_do_nothing(index_elements=conflict, index_where=where)
    if returning is None:
        session.execute(stmt, rows if isinstance(rows, list) else [rows])
        return []
    stmt = stmt.returning(returning)
    if isinstance(rows, dict):
        return list(session.execute(stmt.values(**rows)).scalars())
    return list(session.execute(stmt.values(list(rows))).scalars())
