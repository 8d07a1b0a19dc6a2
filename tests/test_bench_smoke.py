"""Each benchmark's `--quick` form, run as a smoke test so that none can rot unnoticed (one
did: bench/holds.py stopped at its first TRUNCATE when notification_attempts came). The
figures are not asserted here (they are measurements, written in docs/performance.md); that
the bench runs to its end, and its correctness checks pass, is."""

from __future__ import annotations

import re
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


def test_the_hold_sweep_bench_leaves_no_hold_past_due(committed: Engine, redis: Any) -> None:
    out = run_quick("holds.py")
    assert "holds still ACTIVE past due: 0" in out


def test_the_refund_bench_asks_once_per_refund_and_refunds_nothing(
    committed: Engine, redis: Any
) -> None:
    out = run_quick("refunds.py")
    assert (
        "one refund fetch per refund" in out and "nothing else, in every run of ours: PASS" in out
    )
    assert "0 duplicates: PASS" in out


def test_the_notification_bench_delivers_each_notification_once(
    committed: Engine, redis: Any
) -> None:
    out = run_quick("notifications.py")
    assert "emails received: one per notification in every round" in out
    assert "500 each), 0 dead: PASS" in out
    assert re.search(r"batches: [\d,]+ for 500 sends", out), out


def test_the_outage_drill_drains_with_no_refund_made_twice(committed: Engine, redis: Any) -> None:
    out = run_quick("outage.py")
    assert "drained: PASS" in out
    assert "the drill (drained, nothing sent or refunded twice): PASS" in out
    assert "twice 0 (must be 0: PASS)" in out
    assert "every round, one SMS per notification: PASS" in out
    assert "1 alert for 1,000 refunds" in out


def test_the_triage_bench_decides_every_letter_as_the_rules_say(
    committed: Engine, redis: Any
) -> None:
    out = run_quick("dlq.py")
    assert "as the rules say (" in out and "): PASS" in out.split("as the rules say (")[1]
    assert "replay messages: 2,500 for 2,500 replayed, nothing else queued: PASS" in out


def test_the_reconciliation_bench_reports_exactly_the_seeded_differences(
    committed: Engine, redis: Any
) -> None:
    out = run_quick("reconcile.py")
    for gateway in ("razorpay", "stripe"):
        [line] = [line for line in out.splitlines() if line.startswith(f"  {gateway}: ours / ")]
        assert "reports name exactly the seeded differences: PASS" in line, line


def test_the_console_bench_renders_every_page_and_completes_the_bulk_replay(
    committed: Engine, redis: Any
) -> None:
    out = run_quick("console.py")
    for page in ("dead-letter list", "filtered list", "a letter's page", "overview"):
        assert any(line.strip().startswith(page) for line in out.splitlines()), page
    [line] = [line for line in out.splitlines() if "every letter decided" in line]
    assert line.endswith("PASS"), line
