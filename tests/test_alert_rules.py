"""The shipped Prometheus alert rules: promtool's unit tests catch a broken label, and the docs
list every alert as deploy/prometheus/alerts.yml has it (make test runs promtool on the file)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.processes import ROOT

RULES = ROOT / "deploy" / "prometheus"
ALERT_NAME = re.compile(r"\bBackstop[A-Z]\w+")
NOT_ALERTS = {"BackstopTask"}  # the base task class


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((RULES / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def promtool_test(folder: Path) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: run `make promtool` (Debian's prometheus package)")
    return subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def sound_rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the rules and their tests, which promtool passes as they are."""
    folder = tmp_path_factory.mktemp("rules")
    for name in ("alerts.yml", "alerts_test.yml"):
        shutil.copy(RULES / name, folder / name)
    passed = promtool_test(folder)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    return folder


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # The exporter's label renamed back: the rules read a label no series has.
        ("job_name", "job"),
        # The rule the docs used to suggest: `job` is the scrape job, the same on every series.
        ("> backstop_job_window_seconds", "> on(job) backstop_job_window_seconds"),
    ],
    ids=["label-job", "on-job"],
)
def test_promtool_fails_when_the_freshness_rules_read_the_job_label(
    sound_rules: Path, tmp_path: Path, old: str, new: str
) -> None:
    shutil.copy(sound_rules / "alerts_test.yml", tmp_path)
    text = (sound_rules / "alerts.yml").read_text()
    assert old in text
    (tmp_path / "alerts.yml").write_text(text.replace(old, new))
    failed = promtool_test(tmp_path)
    assert failed.returncode != 0
    assert "BackstopScheduledJobLate" in failed.stdout + failed.stderr


def cells(line: str) -> list[str]:
    """A Markdown table row's cells, with `\\|` inside a cell read as `|`."""
    parts = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [part.strip().replace("\\|", "|") for part in parts]


def alert_rows(path: Path) -> dict[str, list[str]]:
    """The rows of a table whose first cell is an alert name in backquotes, by alert."""
    rows = {}
    for line in path.read_text().splitlines():
        if re.match(r"\|\s*`Backstop", line):
            name, *rest = cells(line)
            rows[name.strip("`")] = rest
    return rows


def test_observability_docs_list_every_alert_as_the_rules_file_has_it() -> None:
    documented = alert_rows(ROOT / "docs" / "observability.md")
    assert list(documented) == [rule["alert"] for rule in rules()]
    for rule in rules():
        severity, for_, expr, summary = documented[rule["alert"]]
        assert severity == rule["labels"]["severity"], rule["alert"]
        assert for_ == rule.get("for", "—"), rule["alert"]
        assert expr == f"`{rule['expr']}`", rule["alert"]
        assert summary == rule["annotations"]["summary"], rule["alert"]


def test_readme_lists_every_alert_as_the_rules_file_has_it() -> None:
    listed = alert_rows(ROOT / "README.md")
    assert list(listed) == [rule["alert"] for rule in rules()]
    for rule in rules():
        assert listed[rule["alert"]] == [
            rule["labels"]["severity"],
            rule["annotations"]["summary"],
        ], rule["alert"]


def test_every_alert_has_a_runbook_entry_and_the_docs_name_no_other() -> None:
    shipped = {rule["alert"] for rule in rules()}
    runbook = (ROOT / "docs" / "operations.md").read_text()
    assert sorted(shipped - set(ALERT_NAME.findall(runbook))) == []
    for doc in ("README.md", "docs/observability.md", "docs/operations.md"):
        named = set(ALERT_NAME.findall((ROOT / doc).read_text())) - NOT_ALERTS
        assert sorted(named - shipped) == [], doc
