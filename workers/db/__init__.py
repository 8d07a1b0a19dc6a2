"""The shared database helpers: engine and sessions, lock helpers, the transition helper."""

from workers.db.engine import (
    DatabaseMissing,
    check_database,
    dispose_engine,
    get_engine,
    make_engine,
    new_session,
    on_commit,
    session_scope,
)
from workers.db.locks import claim, is_postgres
from workers.db.statistics import analyze_if_stale
from workers.db.steps import DryRunSteps, Steps, steps_on_one_connection
from workers.db.transitions import (
    MACHINES,
    InvalidTransition,
    Transition,
    audited_update,
    transition,
    transition_batch,
    transition_rows,
    update_each,
)

__all__ = [
    "MACHINES",
    "DatabaseMissing",
    "DryRunSteps",
    "InvalidTransition",
    "Steps",
    "Transition",
    "analyze_if_stale",
    "audited_update",
    "check_database",
    "claim",
    "dispose_engine",
    "get_engine",
    "is_postgres",
    "make_engine",
    "new_session",
    "on_commit",
    "session_scope",
    "steps_on_one_connection",
    "transition",
    "transition_batch",
    "transition_rows",
    "update_each",
]
