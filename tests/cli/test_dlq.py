"""`backstop dlq` on real Postgres and Redis: list, show, replay (by id, --all, --dry-run,
--payload, --edit through a real $EDITOR), discard; clear one-line errors."""

from __future__ import annotations

import json
import os
import pty
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from click.testing import CliRunner
from sqlalchemy import Engine

from tests.conftest import service_env
from tests.workers.factories import add_hold
from tests.workers.test_dlq import dispatched, letter, row, sent
from workers.cli import main
from workers.db import session_scope
from workers.dlq.browse import history
from workers.errors import PayloadError


def run(*args: str, **env: str) -> Any:
    result = CliRunner().invoke(main, list(args), env={"BACKSTOP_ACTOR": "ops:carol", **env})
    return result


@pytest.fixture
def hold(committed: Engine) -> int:
    with session_scope() as session:
        return add_hold(session, datetime.now(UTC) + timedelta(hours=1))


def test_list_groups_by_error_and_filters(committed: Engine, hold: int) -> None:
    letter("holds.expire", {"hold_id": hold})
    letter("holds.expire", {"hold_id": hold})
    letter("refunds.submit", {"refund_id": 1}, PayloadError("invalid payload: refund_id"))
    result = run("dlq", "list", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    counts = {(c["task_name"], c["error_type"]): c["count"] for c in data["counts"]}
    assert counts == {("holds.expire", "TransientError"): 2, ("refunds.submit", "PayloadError"): 1}
    only = json.loads(run("dlq", "list", "--task", "refunds.*", "--json").output)
    assert [item["task_name"] for item in only["letters"]] == ["refunds.submit"]
    by_error = json.loads(run("dlq", "list", "--error", "PayloadError", "--json").output)
    assert len(by_error["letters"]) == 1
    text = run("dlq", "list").output
    assert "holds.expire / TransientError" in text
    bad = run("dlq", "list", "--older-than", "soon")
    assert bad.exit_code == 2 and "'soon' is not a duration" in bad.output


def test_show_prints_payload_error_and_history(committed: Engine, hold: int) -> None:
    letter_id = letter("holds.expire", {"hold_id": hold})
    assert run("dlq", "discard", str(letter_id), "--reason", "test data").exit_code == 0
    data = json.loads(run("dlq", "show", str(letter_id), "--json").output)
    assert data["payload"] == {"hold_id": hold} and data["status"] == "DISCARDED"
    assert "TransientError" in data["traceback"]
    whats = [(item["what"], item["actor"]) for item in data["history"]]
    assert ("NEW -> DISCARDED", "ops:carol") in whats and ("discarded", "ops:carol") in whats
    missing = run("dlq", "show", "9999")
    assert missing.exit_code == 1 and "dead letter 9999 does not exist" in missing.output


def test_dry_run_changes_and_sends_nothing(
    committed: Engine, redis: redis_lib.Redis, hold: int
) -> None:
    ids = [letter("holds.expire", {"hold_id": hold}) for _ in range(3)]
    result = run("dlq", "replay", "--all", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    counts = json.loads(result.output)
    assert (counts["dry_run"], counts["matched"], counts["replayed"]) == (True, 3, 3)
    assert counts["by_task"] == {"holds.expire": 3}
    assert [row(i).status for i in ids] == ["NEW"] * 3 and sent(redis) == []
    assert history_of(ids[0]) == []  # not a trace of the dry run
    refused = run("dlq", "replay", "--all")  # not a terminal, no --yes
    assert refused.exit_code == 1 and "refusing to replay 3 dead letters without --yes" in (
        refused.output
    )
    done = run("dlq", "replay", "--all", "--task", "holds.*", "--yes")
    assert done.exit_code == 0 and "3 matched: 3 replayed" in done.output
    assert [row(i).status for i in ids] == ["RETRYING"] * 3
    # The replays go out through dlq.dispatch, as triage's do, each with its letter's id.
    assert sorted(dispatched(redis)) == sorted(("holds.expire", {"hold_id": hold}, i) for i in ids)
    assert history_of(ids[0]) == [("NEW -> RETRYING", "ops:carol"), ("replayed", "ops:carol")]
    nothing = run("dlq", "replay", "--all", "--task", "holds.*", "--yes")
    assert nothing.exit_code == 1 and "no open dead letters match: nothing to replay" in (
        nothing.output
    )


def test_discard_by_filter_with_a_dry_run_first(committed: Engine, hold: int) -> None:
    kept = letter("refunds.submit", {"refund_id": 1}, PayloadError("invalid payload: refund_id"))
    ids = [letter("holds.expire", {"hold_id": hold}) for _ in range(4)]
    dry = run("dlq", "discard", "--all", "--task", "holds.*", "--reason", "stale", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "dry run: 4 matched; would be 4 discarded" in dry.output
    assert {row(i).status for i in ids} == {"NEW"}
    no_reason = run("dlq", "discard", "--all", "--task", "holds.*")
    assert no_reason.exit_code == 2 and "Missing option '--reason'" in no_reason.output
    done = run("dlq", "discard", "--all", "--task", "holds.*", "--reason", "stale", "--yes")
    assert done.exit_code == 0 and "4 matched: 4 discarded" in done.output, done.output
    assert {row(i).status for i in ids} == {"DISCARDED"} and row(kept).status == "NEW"
    assert {row(i).resolution for i in ids} == {"stale"}
    assert history_of(ids[0]) == [("NEW -> DISCARDED", "ops:carol"), ("discarded", "ops:carol")]
    both = run("dlq", "discard", "1", "--all", "--reason", "x")
    assert both.exit_code == 2 and "give dead letter ids, or --all" in both.output


def history_of(letter_id: int) -> list[tuple[str, str]]:
    with session_scope() as session:
        return [(item["what"], item["actor"]) for item in history(session, letter_id)]


def test_replay_with_a_corrected_payload(
    committed: Engine, redis: redis_lib.Redis, hold: int, tmp_path: Path
) -> None:
    bad = letter("holds.expire", {"hold_id": str(hold)}, PayloadError("invalid payload: hold_id"))
    wrong = run("dlq", "replay", str(bad), "--payload", '{"hold_id": "x"}')
    assert wrong.exit_code == 1
    assert "holds.expire: invalid payload: hold_id: Input should be a valid integer" in wrong.output
    # --edit opens $EDITOR on the payload: a real editor process rewrites the file.
    editor = tmp_path / "editor"
    editor.write_text(f'#!/bin/sh\nprintf \'{{"hold_id": {hold}}}\' > "$1"\n')
    editor.chmod(editor.stat().st_mode | stat.S_IEXEC)
    result = run("dlq", "replay", str(bad), "--edit", "--json", EDITOR=str(editor))
    assert result.exit_code == 0, result.output
    [outcome] = json.loads(result.output)["outcomes"]
    assert outcome["diff"] == {"hold_id": [str(hold), hold]}
    assert sent(redis) == [("holds.expire", {"hold_id": hold}, bad)]
    assert os.environ.get("EDITOR") != str(editor)  # the test's editor did not leak


def test_usage_errors_are_one_line(committed: Engine) -> None:
    assert "give dead letter ids, or --all" in run("dlq", "replay").output
    result = run("dlq", "discard", "1")
    assert result.exit_code == 2 and "Missing option '--reason'" in result.output


def test_a_bulk_action_shows_a_progress_bar_on_a_terminal_and_nothing_with_json(
    committed: Engine, hold: int
) -> None:
    """Run as an operator runs it: stderr a real terminal (a pseudo-terminal here)."""
    for _ in range(3):
        letter("holds.expire", {"hold_id": hold})
    args = ["dlq", "discard", "--all", "--task", "holds.*", "--reason", "test", "--dry-run"]
    shown = on_a_terminal(*args)
    assert "discard 3 dead letters" in shown and "100%" in shown
    quiet = on_a_terminal(*args, "--json")
    assert "discard 3 dead letters" not in quiet and '"matched": 3' in quiet


def on_a_terminal(*args: str) -> str:
    """The command's stdout and stderr, with stderr on a pseudo-terminal."""
    leader, follower = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "workers.cli", *args],
            env=service_env(BACKSTOP_ACTOR="ops:carol"),
            stdout=subprocess.PIPE,
            stderr=follower,
            text=True,
            timeout=60,
        )
        os.close(follower)
        follower = -1
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed: everything was read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if follower != -1:
            os.close(follower)
        os.close(leader)
    assert done.returncode == 0, seen
    return done.stdout + seen.decode(errors="replace")


def test_list_columns_stay_aligned_with_a_long_task_name(committed: Engine, hold: int) -> None:
    long_name = "notifications.deliver_to_the_partner_webhook_with_a_very_long_name"
    letter("holds.expire", {"hold_id": hold})
    letter(long_name, {"channel": "email"}, PayloadError("invalid payload: channel"))
    result = run("dlq", "list")
    assert result.exit_code == 0, result.output
    counts, letters = (block.splitlines() for block in result.output.strip().split("\n\n"))
    # Every row's task and error start under their header, however long a task name is.
    task, error = letters[0].index("task"), letters[0].index("error")
    assert len(letters) == 3
    for name in ("holds.expire", long_name):
        [line] = [line for line in letters[1:] if f" {name} " in line]
        assert line.index(name) == task and line[error - 2 : error] == "  ", line
        assert line[error:].startswith(("TransientError: ", "PayloadError: ")), line
    where = counts[0].index("task / error")
    assert len(counts) == 3
    for line in counts[1:]:
        assert line[where:].startswith(("holds.expire / ", f"{long_name} / ")), line
        # The count is a number: right-aligned, its last digit under the header's last letter.
        assert line[len("count") - 1].isdigit() and line[len("count")] == " ", line
