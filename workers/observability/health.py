"""`backstop health`: is everything backstop needs there, and is its work getting done?"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

from config import Settings
from config.schedule import schedule_windows
from workers.application import app
from workers.db import check_database, session_scope
from workers.errors import one_line
from workers.gateways.registry import breaker_states
from workers.jobs import first_seen, last_finished
from workers.models import DeadLetter

LEVELS = {"ok": 0, "degraded": 1, "unhealthy": 2}


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, degraded or unhealthy
    detail: str


def overall(checks: list[Check]) -> str:
    return max((check.status for check in checks), key=LEVELS.__getitem__, default="ok")


def run_checks(settings: Settings, now: datetime) -> list[Check]:
    checks = [check_broker(settings)]
    try:
        check_database()  # a missing embedded database is named, not created empty
        with session_scope() as session:
            session.execute(text("SELECT 1"))
            checks.append(Check("database", "ok", _where(settings.DATABASE_URL)))
            checks += check_schedules(session, settings, now)
            checks.append(check_dead_letters(session, now))
    except Exception as exc:
        checks.append(Check("database", "unhealthy", one_line(exc)[:200]))
    checks += check_gateways()
    return checks


def check_broker(settings: Settings) -> Check:
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=5)
        return Check("broker", "ok", _where(settings.BROKER_URL))
    except Exception as exc:
        return Check("broker", "unhealthy", one_line(exc)[:200])


def check_schedules(session: object, settings: Settings, now: datetime) -> list[Check]:
    finished = last_finished(session)  # type: ignore[arg-type]
    seen = first_seen(session)  # type: ignore[arg-type]
    return [
        schedule_check(job, window, finished.get(job), seen.get(job), now)
        for job, window in sorted(schedule_windows(settings).items())
    ]


def schedule_check(
    job: str, window: timedelta, last: datetime | None, since: datetime | None, now: datetime
) -> Check:
    """A job is fresh when its last run finished within its window. One that has never run is
    waiting, not late, until a window has passed since it was first seen in the schedule
    (`since`: `backstop db upgrade` and `ops.check_schedules` record it in the database), so a
    fresh deployment, or a job a release adds, is not reported before it had its chance."""
    name = f"schedule {job}"
    if last is not None:
        if now - last > window:
            return Check(
                name, "degraded", f"last run {_age(now - last)} ago; window {_age(window)}"
            )
        return Check(name, "ok", f"last run {_age(now - last)} ago")
    if since is None:
        # Nothing says since when to expect it: `backstop db upgrade` records the schedule and
        # so does beat's schedule check. Neither has run (a plain `alembic upgrade`, beat not
        # started): say so rather than wait for ever.
        return Check(
            name,
            "degraded",
            "has never finished a run, and the schedule is not recorded: run `backstop db "
            "upgrade` (or start beat)",
        )
    scheduled = f"scheduled {_age(now - since)} ago, window {_age(window)}"
    if now - since > window:
        return Check(name, "degraded", f"has never finished a run; {scheduled}")
    return Check(name, "ok", f"waiting for first run; {scheduled}")


# The open dead letters: how many, and since when.
OPEN_LETTERS = select(func.count(), func.min(DeadLetter.created_at)).where(
    DeadLetter.status.in_(("NEW", "MANUAL_REVIEW"))
)


def check_dead_letters(session: object, now: datetime) -> Check:
    count, oldest = session.execute(OPEN_LETTERS).one()  # type: ignore[attr-defined]
    if not count:
        return Check("dead letters", "ok", "none open")
    return Check("dead letters", "degraded", f"{count} open, oldest {_age(now - oldest)} old")


def check_gateways() -> list[Check]:
    status = {"closed": "ok", "not configured": "ok", "half-open": "degraded", "open": "degraded"}
    return [
        Check(
            f"gateway {name}",
            status.get(state, "degraded"),
            f"breaker {state}" if state != "not configured" else state,
        )
        for name, state in breaker_states().items()
    ]


def as_json(checks: list[Check]) -> dict[str, object]:
    return {"status": overall(checks), "checks": [asdict(check) for check in checks]}


def _where(url: str) -> str:
    # Never print credentials: scheme, host and path only.
    try:
        parsed = make_url(url)
        return parsed.render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def _age(delta: object) -> str:
    seconds = int(delta.total_seconds())  # type: ignore[attr-defined]
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"
