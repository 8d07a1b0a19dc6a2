"""`backstop refunds` on real Postgres: the list, one refund's story, and the actions, each a
one-line answer, audited under --actor."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Engine

from tests.cli.test_dlq import run
from tests.workers.test_refunds import add_refund, refund, set_row


def test_list_show_and_resolve_from_the_command_line(committed: Engine, sim: Any) -> None:
    failed = add_refund(sim, "stripe")
    set_row(failed, status="FAILED", attempts=3, requires_manual_review=True, last_error="HTTP 400")
    unknown = add_refund(sim, "razorpay")
    set_row(unknown, status="PROCESSING", requires_manual_review=True)

    listed = json.loads(run("refunds", "list", "--json").output)
    assert listed["total"] == 2 and [r["id"] for r in listed["refunds"]] == [failed, unknown]
    text = run("refunds", "list").output
    assert "HTTP 400" in text and "2 need a person" in text

    shown = json.loads(run("refunds", "show", str(failed), "--json").output)
    assert (shown["status"], shown["gateway"], shown["attempts"]) == ("FAILED", "stripe", 3)

    refused = run("refunds", "retry", str(unknown), "--reason", "again")
    assert refused.exit_code == 1
    assert f"refund {unknown} is PROCESSING: the gateway has it; re-check it" in refused.output
    resolved = run("refunds", "resolve", str(failed), "--reason", "refunded by hand")
    assert resolved.exit_code == 0 and f"refund {failed}: resolved" in resolved.output
    assert refund(failed).resolution == "refunded by hand"
    history = json.loads(run("refunds", "show", str(failed), "--json").output)["history"]
    assert history[-1]["actor"] == "ops:carol"
    missing = run("refunds", "show", "999999")
    assert missing.exit_code == 1 and "refund 999999 does not exist" in missing.output
