"""The shipped Prometheus alert rules: promtool's unit tests catch a broken label (make test runs
promtool on deploy/prometheus/alerts.yml and its tests)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.processes import ROOT

RULES = ROOT / "deploy" / "prometheus"


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
