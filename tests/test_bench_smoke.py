"""Each benchmark's `--quick` form, run as a smoke test so that none can rot unnoticed. The
figures are not asserted here (they are measurements, written in docs/performance.md); that
the bench runs to its verdict, and its correctness checks pass, is."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.conftest import service_env
from tests.processes import ROOT

pytestmark = pytest.mark.e2e


def run_quick(script: str) -> str:
    done = subprocess.run(
        [sys.executable, f"bench/{script}", "--quick"],
        env=service_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_the_deferral_bench_runs_and_no_refund_reaches_an_open_gateway(
    committed: Engine, redis: Any
) -> None:
    out = run_quick("defer.py")
    assert "refunds that reached the gateway (must be 0): 0" in out
    assert "ratio baseline/ours" in out


def test_the_fault_drills_keep_their_promises(committed: Engine, redis: Any) -> None:
    out = run_quick("faults.py")
    for drill in ("(a) ", "(b) ", "(c) "):
        [line] = [line for line in out.splitlines() if line.startswith(drill)]
        assert line.endswith("PASS"), line
