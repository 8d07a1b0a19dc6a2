"""`backstop reconcile`, run as operators run it: a process with its own environment."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

from click.testing import CliRunner
from sqlalchemy import Engine, insert

from tests.conftest import service_env
from tests.workers.test_reconciliation_review import add_run
from workers.cli import main
from workers.db import session_scope
from workers.models import Payment

DAY = "2026-05-04"
NOON = datetime(2026, 5, 4, 12, tzinfo=UTC)


def backstop(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env=service_env(TIMEZONE="UTC", **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def gateway_env(server: Any, sim: Any) -> dict[str, str]:
    return {
        "RAZORPAY_KEY_ID": sim.razorpay_key_id,
        "RAZORPAY_KEY_SECRET": sim.razorpay_key_secret,
        "RAZORPAY_BASE_URL": server.url,
    }


def test_bad_arguments_get_one_line(committed: Engine) -> None:
    from click.testing import CliRunner

    from workers.cli import main

    cases = {
        ("--from", "2026-13-01"): "Error: bad --from date '2026-13-01': expected YYYY-MM-DD",
        ("--from", DAY, "--to", "2026-05-01"): "Error: --to 2026-05-01 is before --from 2026-05-04",
        ("--gateway", "paypal", "--from", DAY): (
            "Error: unknown gateway 'paypal': expected razorpay or stripe"
        ),
        ("--gateway", "stripe", "--from", DAY): (
            "Error: stripe is not configured: set STRIPE_API_KEY"
        ),
        ("--show", "999"): "Error: no reconciliation run 999",
        (): "Error: --from DATE is required (or --show RUN)",
    }
    for args, message in cases.items():
        result = CliRunner().invoke(main, ["reconcile", *args])
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.strip() == message and result.stdout == ""


def test_a_day_reconciled_with_a_report_and_shown_again(
    committed: Engine, simulator_server: Any, sim: Any
) -> None:
    captured = sim.add_payment(
        "razorpay", amount=9_900, currency="INR", created=int(NOON.timestamp())
    )["id"]
    stranger = sim.add_payment(
        "razorpay", amount=100, currency="INR", created=int(NOON.timestamp())
    )["id"]
    with session_scope() as session:
        session.execute(
            insert(Payment).values(
                gateway="razorpay",
                gateway_payment_id=captured,
                amount=9_900,
                currency="INR",
                status="PENDING",
                created_at=NOON,
            )
        )
    result = backstop(
        "reconcile",
        "--gateway",
        "razorpay",
        "--from",
        DAY,
        "--json",
        **gateway_env(simulator_server, sim),
    )
    assert result.returncode == 0, result.stderr
    assert "reconciling razorpay 2026-05-04..2026-05-04" in result.stderr
    (run,) = json.loads(result.stdout)["runs"]
    assert run["outcome"] == "completed" and run["status"] == "COMPLETED"
    assert run["window_start"] == "2026-05-04T00:00:00+00:00"
    assert run["counts"]["payments"] == 2 and run["counts"]["fixed"] == 1
    assert {(d["type"], d["gateway_payment_id"], d["fixed"]) for d in run["discrepancies"]} == {
        ("STATUS_MISMATCH", captured, True),
        ("MISSING_IN_DB", stranger, False),
    }

    table = backstop(
        "reconcile", "--gateway", "razorpay", "--from", DAY, **gateway_env(simulator_server, sim)
    )
    assert table.returncode == 0
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:5] == ["run", "gateway", "day", "outcome", "payments"]
    # The day again, in a new run: the fix is made, the stranger is still a stranger.
    assert row.split()[1:7] == ["razorpay", DAY, "completed", "2", "0", "1"]
    assert "1 discrepancies need review" in table.stdout

    shown = backstop("reconcile", "--show", str(run["run_id"]))
    assert shown.returncode == 0
    assert f"run {run['run_id']}: razorpay" in shown.stdout
    assert "MISSING_IN_DB" in shown.stdout and "REVIEW" in shown.stdout and stranger in shown.stdout


def test_runs_findings_and_their_review_from_the_command_line(committed: Any) -> None:
    run_id, ids = add_run(findings=3, fixed=1)
    cli = CliRunner()
    env = {"BACKSTOP_ACTOR": "ops:carol"}
    runs = json.loads(cli.invoke(main, ["reconcile", "runs", "--json"], env=env).output)
    assert [(r["id"], r["waiting"]) for r in runs] == [(run_id, 2)]
    waiting = cli.invoke(main, ["reconcile", "findings", str(run_id), "--waiting", "--json"])
    assert [f["id"] for f in json.loads(waiting.output)] == ids[1:]
    done = cli.invoke(main, ["reconcile", "resolve", *map(str, ids[1:]), "--reason", "ok"], env=env)
    assert done.exit_code == 0 and f"finding {ids[2]}: RESOLVED" in done.output
    again = cli.invoke(main, ["reconcile", "acknowledge", str(ids[1]), "--reason", "x"], env=env)
    assert f"finding {ids[1]} is RESOLVED: not ACKNOWLEDGED" in again.output
    blank = cli.invoke(main, ["reconcile", "resolve", str(ids[0]), "--reason", " "], env=env)
    assert blank.exit_code == 1 and "resolving needs a reason" in blank.output
    shown = cli.invoke(main, ["reconcile", "--show", str(run_id)])
    assert shown.exit_code == 0 and "RESOLVED" in shown.output
