"""The console in a real browser: Debian's Chromium, headless, driven by Playwright, against
`backstop console` started as production starts it, and a real worker that runs the replay."""

from __future__ import annotations

import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlalchemy import Engine, select

from tests.conftest import service_env, wait_until
from tests.console.conftest import PASSWORDS, new_letter
from tests.processes import Proc
from tests.workers.factories import add_hold
from workers.db import session_scope
from workers.errors import PermanentError
from workers.models import BookingHold, DeadLetter

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def console(committed: Engine, redis: Any, console_users: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = Proc(
        [sys.executable, "-m", "workers.cli", "console", "--port", str(port)],
        service_env(
            CONSOLE_USERS=console_users,
            CONSOLE_SECRET_KEY="browser-test-secret",
            CONSOLE_COOKIE_SECURE="false",
        ),
        tmp_path / "console.log",
    )
    proc.wait_for("backstop console on", timeout=30)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(port), timeout=15)
    yield url
    proc.stop()


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: `make test` installs it (apt install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


def log_in(browser: Browser, url: str, name: str, password: str | None = None) -> Page:
    page = browser.new_page()
    page.goto(f"{url}/dead-letters")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORDS[name] if password is None else password)
    page.click("button[type=submit]")
    return page


def status(letter_id: int) -> str:
    with session_scope() as session:
        return session.get(DeadLetter, letter_id).status  # type: ignore[union-attr]


def test_an_operator_fixes_a_payload_in_the_browser_and_a_worker_replays_it(
    console: str, browser: Browser, start_worker: Callable[..., Proc], tmp_path: Path
) -> None:
    start_worker()
    with session_scope() as session:
        hold = add_hold(session, datetime.now(UTC) - timedelta(seconds=5))
    letter = new_letter("holds.expire", {"hold_id": "abc"}, PermanentError("bad hold_id"))
    new_letter("refunds.submit", {"refund_id": 7})

    refused = log_in(browser, console, "alice", "not-her-password")
    expect(refused.get_by_role("alert")).to_have_text("wrong name or password")
    refused.close()

    page = log_in(browser, console, "alice")
    page.fill("input[name=task]", "holds.*")
    page.click("text=Filter")
    expect(page.locator("table.letters tbody tr")).to_have_count(1)
    page.click(f"a[href='/dead-letters/{letter}']")
    expect(page.locator("h1")).to_contain_text(f"Dead letter {letter}")

    page.fill("textarea[name=payload]", '{"hold_id": "x"}')
    page.click("text=Check and replay")
    expect(page.get_by_role("alert")).to_contain_text("Not sent: holds.expire: invalid payload")
    assert status(letter) == "NEW"

    page.fill("textarea[name=payload]", f'{{"hold_id": {hold}}}')
    page.fill("input[name=reason]", "hold id was a string")
    page.click("text=Check and replay")
    expect(page.locator("table.diff")).to_contain_text("hold_id")
    expect(page.locator("table.diff")).to_contain_text('"abc"')
    page.screenshot(path=str(tmp_path / "console-confirm.png"), full_page=True)
    page.click("text=Replay now")
    expect(page.get_by_role("status")).to_contain_text(f"dead letter {letter}: replayed")

    wait_until(lambda: status(letter) == "REPLAYED", timeout=30)
    page.reload()
    expect(page.locator("h1 .status")).to_have_text("REPLAYED")
    expect(page.locator("table.history")).to_contain_text("alice")
    with session_scope() as session:
        assert session.get(BookingHold, hold).status == "EXPIRED"  # type: ignore[union-attr]


def test_a_viewer_sees_no_action_and_markup_stays_inert(console: str, browser: Browser) -> None:
    letter = new_letter(
        "holds.expire",
        {"hold_id": '<img src=x onerror="window.pwned=1">'},
        PermanentError("<script>window.pwned=2</script>"),
    )
    page = log_in(browser, console, "victor")
    page.goto(f"{console}/dead-letters/{letter}")
    expect(page.locator("h1")).to_contain_text(f"Dead letter {letter}")
    assert page.locator("button", has_text="Replay").count() == 0
    assert page.locator("button", has_text="Discard").count() == 0
    expect(page.locator(".error-text").first).to_contain_text("<script>window.pwned=2</script>")
    assert page.evaluate("window.pwned") is None
    # A discard forged from the viewer's own session, with its valid CSRF token: forbidden.
    token = page.locator("input[name=csrf_token]").first.get_attribute("value")
    forged = page.request.post(
        f"{console}/dead-letters/{letter}/discard", form={"reason": "x", "csrf_token": token or ""}
    )
    assert forged.status == 403 and status(letter) == "NEW"


def test_a_post_without_its_csrf_token_is_refused_in_the_browser(
    console: str, browser: Browser
) -> None:
    letter = new_letter("holds.expire", {"hold_id": 1})
    page = log_in(browser, console, "alice")
    page.goto(f"{console}/dead-letters/{letter}")
    expect(page.locator("h1")).to_contain_text(f"Dead letter {letter}")
    refused = page.request.post(f"{console}/dead-letters/{letter}/discard", form={"reason": "x"})
    assert refused.status == 400 and "CSRF token is missing" in refused.text()
    assert status(letter) == "NEW"


def test_a_bulk_replay_of_a_thousand_letters_names_its_count_before_anything_is_sent(
    console: str,
    browser: Browser,
    redis: Any,
    start_worker: Callable[..., Proc],
    tmp_path: Path,
) -> None:
    with session_scope() as session:
        hold = add_hold(session, datetime.now(UTC) - timedelta(seconds=5))
    ids = [new_letter("holds.expire", {"hold_id": hold}) for _ in range(1000)]
    untouched = new_letter("refunds.submit", {"refund_id": 7})

    page = log_in(browser, console, "alice")
    page.fill("input[name=task]", "holds.*")
    page.click("text=Filter")
    page.fill("section.bulk input[name=reason]", "database is back")
    page.click("text=Count and confirm")
    expect(page.locator("h1")).to_have_text("Replay 1,000 dead letters?")
    expect(page.locator("table.bulk-count")).to_contain_text("holds.expire")
    page.screenshot(path=str(tmp_path / "console-bulk.png"), full_page=True)
    assert statuses(ids) == {"NEW"}  # the count sent nothing, changed nothing
    assert sum(redis.llen(q) for q in ("critical", "default", "batch")) == 0

    start_worker()
    page.get_by_role("button", name="Replay 1,000 dead letters").click()
    expect(page.get_by_role("status")).to_contain_text("replay of 1000 dead letters queued")
    wait_until(lambda: statuses(ids) == {"REPLAYED"}, timeout=120)
    assert status(untouched) == "NEW"
    with session_scope() as session:
        assert session.get(BookingHold, hold).status == "EXPIRED"  # type: ignore[union-attr]


def statuses(ids: list[int]) -> set[str]:
    with session_scope() as session:
        return set(session.scalars(select(DeadLetter.status).where(DeadLetter.id.in_(ids))))
