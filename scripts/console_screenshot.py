"""Screenshot the operator console as `make run` shows it: log in as the demo operator and
shoot the dead letters and one letter's page (docs/console.png, docs/console-letter.png).

Run while `make run` is up: .venv/bin/python scripts/console_screenshot.py"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

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
        page.goto(f"{URL}/dead-letters")
        page.screenshot(path=str(ROOT / "docs" / "console.png"), full_page=True)
        first = page.locator("table.letters a").first
        if first.count():
            first.click()
            page.screenshot(path=str(ROOT / "docs" / "console-letter.png"), full_page=True)
        browser.close()
    print("docs/console.png written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
