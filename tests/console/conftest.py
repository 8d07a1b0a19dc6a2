"""The console under test: its app on the test Postgres, two users, and helpers to log in
and post forms with their CSRF token, as a browser does."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from config.settings import load_settings
from tests.tasks.test_dlq_worker import new_letter
from workers.console import create_app
from workers.console.auth import hash_password

__all__ = ["PASSWORDS", "csrf", "log_in", "new_letter", "post"]

PASSWORDS = {"alice": "alice-operator-pw", "victor": "victor-viewer-pw"}


@pytest.fixture(scope="session")
def console_users() -> str:
    return (
        f"alice:operator:{hash_password(PASSWORDS['alice'])},"
        f"victor:viewer:{hash_password(PASSWORDS['victor'])}"
    )


@pytest.fixture
def console_app(committed: Any, console_users: str) -> Iterator[Flask]:
    settings = load_settings(
        CONSOLE_USERS=console_users,
        CONSOLE_SECRET_KEY="test-secret-key-for-the-console",
        CONSOLE_COOKIE_SECURE=False,
        CONSOLE_TRUSTED_USER_HEADER="X-Forwarded-Email",
        CONSOLE_TRUSTED_PROXIES="10.0.0.0/8",
        CONSOLE_TRUSTED_OPERATORS="olga@example.com",
    )
    app = create_app(settings)
    app.config["TESTING"] = True
    yield app


def csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF token on the page"
    return found.group(1)


def log_in(client: FlaskClient, name: str, password: str | None = None) -> Any:
    page = client.get("/login")
    return client.post(
        "/login",
        data={
            "username": name,
            "password": PASSWORDS[name] if password is None else password,
            "csrf_token": csrf(page.get_data(as_text=True)),
        },
    )


def post(client: FlaskClient, path: str, page: str, **form: str) -> Any:
    """POST `form` to `path` with the CSRF token of the page at `page`, as its form would."""
    token = csrf(client.get(page).get_data(as_text=True))
    return client.post(path, data={**form, "csrf_token": token})
