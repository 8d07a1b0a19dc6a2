"""Screenshot the operator console as `make run` shows it: log in as the demo operator and
shoot every page: the overview (docs/console.png), the dead letters, a bulk replay's count
(nothing is sent), one letter, the
refunds and one refund, the reconciliation runs and the newest run, and the schedules
(docs/console-*.png).

Run while `make run` is up: .venv/bin/python scripts/console_screenshot.py"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
URL = "http://127.0.0.1:8000"


def main() -> int:
    password = (ROOT / "var" / "console-demo-password").read_text().strip()
    chromium = shutil.which("chromium")
    if chromium is None:
        print("chromium is not installed (make chromium)", file=sys.stderr)
        return 1
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{URL}/login")
        page.fill("input[name=username]", "demo")
        page.fill("input[name=password]", password)
        page.click("button[type=submit]")
        shoot(page, "/", "console.png")
        shoot(page, "/dead-letters", "console-letters.png")
        if page.locator("section.bulk").count():  # the count before a bulk replay: sends nothing
            page.fill("section.bulk input[name=reason]", "the cause is fixed")
            page.click("text=Count and confirm")
            page.screenshot(path=str(ROOT / "docs" / "console-bulk.png"), full_page=True)
        follow(page, "table.letters a", "console-letter.png")
        shoot(page, "/refunds", "console-refunds.png")
        follow(page, "table.refunds a", "console-refund.png")
        shoot(page, "/reconciliation", "console-reconciliation.png")
        follow(page, "table.runs a", "console-run.png")
        shoot(page, "/schedules", "console-schedules.png")
        browser.close()
    print("docs/console*.png written")
    return 0


def shoot(page: Page, path: str, name: str) -> None:
    page.goto(f"{URL}{path}")
    page.screenshot(path=str(ROOT / "docs" / name), full_page=True)


def follow(page: Page, link: str, name: str) -> None:
    """The first link of the page's table, if it has one."""
    first = page.locator(link).first
    if first.count():
        first.click()
        page.screenshot(path=str(ROOT / "docs" / name), full_page=True)


if __name__ == "__main__":
    sys.exit(main())
