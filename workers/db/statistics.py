"""The planner's picture of a table, brought up to date when a batch has just changed much of it.

Autovacuum analyzes a table once a tenth of its rows have changed, but only on its next round
(up to `autovacuum_naptime`, a minute by default, later on a busy server). Until then the planner
plans from the old statistics: after triage has moved 100,000 letters out of NEW, it still
believes there are no letters in MANUAL_REVIEW, and an operator's `dlq replay --all` a few
seconds later updates each batch through the status index, testing every letter in manual
review against the batch's ids (1.5 s a batch instead of 0.1 s, measured). A bulk run that is
about to touch many rows calls `analyze_if_stale` first.
"""

from __future__ import annotations

import logging

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from workers.db.locks import is_postgres
from workers.errors import one_line

log = logging.getLogger("backstop.db")

# Autovacuum's own defaults: `autovacuum_analyze_threshold` + `..._scale_factor` x rows.
THRESHOLD = 50
SCALE_FACTOR = 0.1
LOCK_TIMEOUT_MS = 500  # a VACUUM holding the table: go on without the fresh statistics

_STALE = text(
    "SELECT s.n_mod_since_analyze > :threshold + :scale * greatest(c.reltuples, 0) "
    "FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid "
    "WHERE s.relid = CAST(:table AS regclass)"
)


def analyze_if_stale(session: Session, table: str) -> bool:
    """ANALYZE `table` now if autovacuum would (enough rows changed since its last analyze).
    Run it in a step of its own, never in a dry run: ANALYZE holds a lock that keeps other
    ANALYZEs and VACUUMs of the table waiting until the transaction ends (reads and writes are
    not held), and its reset of the change counter is not undone by a rollback. It only speeds
    up what follows: if the lock is not to be had at once (a VACUUM running) or it fails, that
    is logged and the caller goes on. True if it analyzed. A no-op on SQLite."""
    if not is_postgres(session):
        return False
    stale = session.execute(
        _STALE, {"table": table, "threshold": THRESHOLD, "scale": SCALE_FACTOR}
    ).scalar()
    if not stale:
        return False
    quoted = session.get_bind().dialect.identifier_preparer.quote(table)
    try:
        with session.begin_nested():
            session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_MS}ms'"))
            session.execute(text(f"ANALYZE {quoted}"))
    except DBAPIError as exc:
        log.warning("analyze.skipped", extra={"table": table, "error": one_line(exc)[:200]})
        return False
    return True
