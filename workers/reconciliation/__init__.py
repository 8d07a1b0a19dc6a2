"""Reconciliation: a gateway's payments over a window, compared with ours.

`runs` opens runs (one per gateway and window) and holds their lease, `listing` pages through
the gateway, `compare` compares a batch of pages with the database and writes what it found,
`run` drives one run from its claim to its report.
"""

from workers.reconciliation.compare import IdSet, gateway_status
from workers.reconciliation.run import RunOptions, discrepancies, reconcile_run, run_report
from workers.reconciliation.run_records import (
    GATEWAYS,
    TYPES,
    LeaseLost,
    RunResult,
    RunState,
    configured_gateways,
    day_window,
    new_owner,
    open_run,
    open_runs,
    plan_nightly,
)

__all__ = [
    "GATEWAYS",
    "TYPES",
    "IdSet",
    "LeaseLost",
    "RunOptions",
    "RunResult",
    "RunState",
    "configured_gateways",
    "day_window",
    "discrepancies",
    "gateway_status",
    "new_owner",
    "open_run",
    "open_runs",
    "plan_nightly",
    "reconcile_run",
    "run_report",
]
