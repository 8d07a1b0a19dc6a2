"""The whole beat schedule in one place: kebab-case entry names, the contract's task names."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from celery.schedules import crontab

from config.settings import Settings, parse_cron

CHECK_SCHEDULES_EVERY = timedelta(minutes=5)

# Jobs that run every few seconds and keep one heartbeat row per hour (`ctx.heartbeat`) instead
# of claiming a slot per run: there is no slot to "run now" for them.
HEARTBEAT_JOBS = frozenset({"holds.sweep_expired", "notifications.sweep_outbox"})


def beat_schedule(settings: Settings) -> dict[str, dict[str, object]]:
    sweep = settings.HOLD_SWEEP_SECONDS
    return {
        "sweep-expired-holds": {
            "task": "holds.sweep_expired",
            "schedule": timedelta(seconds=sweep),
            # A sweep that waited longer than one interval is superseded by the next one.
            "options": {"queue": "critical", "expires": sweep},
        },
        "retry-stuck-refunds": {
            "task": "refunds.retry_stuck",
            "schedule": parse_cron(settings.REFUND_RETRY_CRON),
            "options": {"queue": "critical"},
        },
        "triage-dead-letters": {
            "task": "dlq.triage",
            "schedule": parse_cron(settings.DLQ_TRIAGE_CRON),
            "options": {"queue": "default"},
        },
        "prune-old-rows": {
            "task": "ops.retention",
            "schedule": parse_cron(settings.RETENTION_CRON),
            "options": {"queue": "batch"},
        },
        "sweep-notification-outbox": {
            "task": "notifications.sweep_outbox",
            "schedule": timedelta(seconds=settings.NOTIFY_OUTBOX_SWEEP_SECONDS),
            "options": {
                "queue": "notifications",
                "expires": settings.NOTIFY_OUTBOX_SWEEP_SECONDS,
            },
        },
        "reconcile-nightly": {
            "task": "reconciliation.nightly",
            "schedule": parse_cron(settings.RECONCILE_CRON),
            "options": {"queue": "batch"},
        },
        "check-in-flight-payments": {
            "task": "payments.check_in_flight",
            "schedule": timedelta(seconds=settings.PAYMENT_JANITOR_SECONDS),
            "options": {"queue": "default", "expires": settings.PAYMENT_JANITOR_SECONDS},
        },
        "check-schedules": {
            "task": "ops.check_schedules",
            "schedule": CHECK_SCHEDULES_EVERY,
            "options": {"queue": "default", "expires": CHECK_SCHEDULES_EVERY.total_seconds()},
        },
    }


_gaps: dict[tuple[str, int], timedelta] = {}


def longest_gap(schedule: crontab, days: int = 8) -> timedelta:
    """The longest wait between two consecutive runs of a cron schedule (over a week and a
    day, which covers every day-of-week pattern). Walked minute by minute once per schedule."""
    key = (repr(schedule), days)
    if key not in _gaps:
        _gaps[key] = _longest_gap(schedule, days)
    return _gaps[key]


def _longest_gap(schedule: crontab, days: int) -> timedelta:
    start = datetime(2026, 1, 5, tzinfo=UTC)  # a Monday
    at, gap = start, timedelta(0)
    while at < start + timedelta(days=days):
        nxt = _next_run(schedule, at)
        gap = max(gap, nxt - at)
        at = nxt
    return gap


def _next_run(schedule: crontab, after: datetime) -> datetime:
    minute = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while not _matches(schedule, minute):
        minute += timedelta(minutes=1)
    return minute


def _matches(schedule: crontab, at: datetime) -> bool:
    return (
        at.minute in schedule.minute
        and at.hour in schedule.hour
        and at.day in schedule.day_of_month
        and at.month in schedule.month_of_year
        and at.isoweekday() % 7 in schedule.day_of_week
    )


def schedule_windows(settings: Settings) -> dict[str, timedelta]:
    """How long each scheduled job may go without finishing a run before it counts as missed:
    its longest interval plus a grace (refund retries every 30 minutes: 40 minutes)."""
    sweep = timedelta(seconds=settings.HOLD_SWEEP_SECONDS)
    return {
        "holds.sweep_expired": sweep * 6 + timedelta(seconds=30),
        "refunds.retry_stuck": longest_gap(parse_cron(settings.REFUND_RETRY_CRON))
        + timedelta(minutes=10),
        "dlq.triage": longest_gap(parse_cron(settings.DLQ_TRIAGE_CRON)) + timedelta(minutes=10),
        "ops.retention": longest_gap(parse_cron(settings.RETENTION_CRON)) + timedelta(hours=1),
        "notifications.sweep_outbox": timedelta(seconds=settings.NOTIFY_OUTBOX_SWEEP_SECONDS) * 5
        + timedelta(minutes=1),
        # The nightly job only opens and sends the runs: an hour is plenty.
        "reconciliation.nightly": longest_gap(parse_cron(settings.RECONCILE_CRON))
        + timedelta(hours=1),
        "payments.check_in_flight": timedelta(seconds=settings.PAYMENT_JANITOR_SECONDS * 3)
        + timedelta(minutes=1),
    }


def beat_entry(job_name: str, settings: Settings) -> dict[str, object]:
    entry = next((e for e in beat_schedule(settings).values() if e["task"] == job_name), None)
    if entry is None:
        raise KeyError(f"{job_name} is not a scheduled job")
    return entry


def next_due(job_name: str, settings: Settings, now: datetime) -> datetime:
    """When the beat entry of `job_name` next fires after `now`, in UTC."""
    schedule = beat_entry(job_name, settings)["schedule"]
    if isinstance(schedule, timedelta):
        return current_slot(job_name, settings, now) + schedule
    assert isinstance(schedule, crontab)
    local = now.astimezone(ZoneInfo(settings.TIMEZONE))
    return _next_run(schedule, local).astimezone(UTC)


def current_slot(job_name: str, settings: Settings, now: datetime) -> datetime:
    """The schedule slot a run of `job_name` at `now` belongs to: the latest time its beat entry
    fired at or before `now` (a cron in TIMEZONE, or a multiple of its interval), in UTC."""
    schedule = beat_entry(job_name, settings)["schedule"]
    if isinstance(schedule, timedelta):
        step = schedule.total_seconds()
        return datetime.fromtimestamp(now.timestamp() // step * step, tz=UTC)
    assert isinstance(schedule, crontab)
    local = now.astimezone(ZoneInfo(settings.TIMEZONE)).replace(second=0, microsecond=0)
    limit = local - longest_gap(schedule) - timedelta(minutes=1)
    while local > limit:
        if _matches(schedule, local):
            return local.astimezone(UTC)
        local -= timedelta(minutes=1)
    raise ValueError(f"{job_name}: no slot found before {now.isoformat()}")
