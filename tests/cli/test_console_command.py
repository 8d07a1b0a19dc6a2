"""`backstop console`: its password hashes, and its refusal to start without users."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner
from werkzeug.security import check_password_hash

from tests.conftest import service_env
from workers.cli import main


def test_hash_password_makes_an_scrypt_hash_the_console_accepts() -> None:
    result = CliRunner().invoke(
        main, ["console", "hash-password", "--password", "a-long-enough-password"]
    )
    assert result.exit_code == 0, result.output
    hashed = result.output.strip()
    assert hashed.startswith("scrypt:") and "a-long-enough-password" not in hashed
    assert check_password_hash(hashed, "a-long-enough-password")
    short = CliRunner().invoke(main, ["console", "hash-password", "--password", "short"])
    assert short.exit_code == 1 and "at least 12 characters" in short.output


def test_the_console_will_not_start_without_a_way_to_know_its_users() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "console", "--port", "18999"],
        env=service_env(CONSOLE_USERS="", CONSOLE_TRUSTED_USER_HEADER=""),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("Error: the console needs CONSOLE_USERS")
