"""backstop's workers: the Celery app, the base task, the database helpers and the services.

`celery -A workers ...` finds the app through `workers.app`, loaded on first use so that
importing a helper module does not build the Celery app.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from workers.celery_app import app

        return app
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
