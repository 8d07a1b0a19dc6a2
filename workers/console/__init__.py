"""The operator console: a server-rendered web app over the same functions the CLI and the
tasks call (`backstop console`). Every action is audited with the operator's own name."""

from __future__ import annotations

import secrets
from typing import Any

from flask import Flask, g, session
from flask_wtf.csrf import CSRFProtect

from config import Settings, get_settings
from workers.console import (  # noqa: F401  (their routes join the blueprint)
    overview_page,
    reconciliation_pages,
    refund_pages,
    schedule_pages,
)
from workers.console.auth import Authority, LoginThrottle
from workers.console.views import bp
from workers.gateways.registry import get_gateway

# Strict: no inline script or style, nothing from elsewhere, never in a frame.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def create_app(settings: Settings | None = None) -> Flask:
    """The console for `settings`; a ConsoleConfigError names a setting that cannot work."""
    settings = settings or get_settings()
    authority = Authority.from_settings(settings)
    app = Flask(__name__)
    secret = settings.CONSOLE_SECRET_KEY
    app.config.update(
        # Without a configured key the sessions last as long as this process.
        SECRET_KEY=secret.get_secret_value() if secret else secrets.token_hex(32),
        SESSION_COOKIE_NAME="backstop_console",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.CONSOLE_COOKIE_SECURE,
        PERMANENT_SESSION_LIFETIME=12 * 3600,
        WTF_CSRF_TIME_LIMIT=None,  # the token lives as long as the session
        MAX_CONTENT_LENGTH=1_000_000,
    )
    app.extensions["backstop"] = {
        "settings": settings,
        "authority": authority,
        "throttle": LoginThrottle(settings),
        # How a re-check reaches a gateway: its adapter, built from this process's settings.
        "gateway_for": get_gateway,
    }
    CSRFProtect(app)
    app.register_blueprint(bp)

    @app.after_request
    def headers(response: Any) -> Any:
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.context_processor
    def user() -> dict[str, Any]:
        return {"user": g.get("user"), "flower_url": settings.CONSOLE_FLOWER_URL}

    _ = session
    return app
