"""One owner per transaction: the task (or a CLI command, or a test) owns its session; a
service commits between its steps only through `Steps` (`with steps.step(...)`), and so never
calls `commit()` or `rollback()` itself."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Owners: the session's own scope and Steps, the command line, the local stand-ins.
OWNERS = ("workers/db/", "workers/cli/", "workers/devtools/")


def transaction_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("commit", "rollback")
        ):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.func.attr}()")
    return found


def test_services_and_tasks_never_commit_themselves() -> None:
    calls = [
        call
        for path in sorted([*ROOT.glob("workers/**/*.py"), *ROOT.glob("tasks/*.py")])
        if not str(path.relative_to(ROOT)).startswith(OWNERS)
        for call in transaction_calls(path)
    ]
    assert calls == [], "commit through Steps (with steps.step(...)) instead:\n" + "\n".join(calls)
