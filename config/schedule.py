"""The whole beat schedule in one place: kebab-case entry names, the contract's task names."""

from __future__ import annotations

from datetime import timedelta

from config.settings import Settings


def beat_schedule(settings: Settings) -> dict[str, dict[str, object]]:
    sweep = settings.HOLD_SWEEP_SECONDS
    return {
        "sweep-expired-holds": {
            "task": "holds.sweep_expired",
            "schedule": timedelta(seconds=sweep),
            # A sweep that waited longer than one interval is superseded by the next one.
            "options": {"queue": "critical", "expires": sweep},
        },
    }
