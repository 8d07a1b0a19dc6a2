"""Settings, the Celery configuration and the beat schedule."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest

from config.celery import QUEUES, max_countdown
from config.settings import COUNTDOWN_CEILING_SECONDS, Settings, SettingsError, load_settings
from tests.conftest import service_env
from tests.processes import ROOT
from workers.celery_app import app


def test_defaults_are_the_contract_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "BROKER_URL"):
        monkeypatch.delenv(name)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.DATABASE_URL.startswith("sqlite:///") and settings.DATABASE_URL.endswith(
        "var/backstop.sqlite"
    )
    assert settings.BROKER_URL == "filesystem://"
    assert (settings.TIMEZONE, settings.HOLD_SWEEP_SECONDS, settings.REFUND_RETRY_CRON) == (
        "UTC",
        5,
        "*/30 * * * *",
    )
    assert (settings.REFUND_STUCK_AFTER_SECONDS, settings.REFUND_ESCALATE_AFTER_SECONDS) == (
        3600,
        86400,
    )
    assert (settings.RECONCILE_CRON, settings.DLQ_TRIAGE_CRON) == ("0 2 * * *", "*/15 * * * *")
    assert (settings.NOTIFY_MAX_ATTEMPTS, settings.NOTIFY_BACKOFF_SECONDS) == (5, 60)
    assert settings.DLQ_MANUAL_AFTER_SECONDS == 86400
    assert settings.SENTRY_DSN is None and settings.FLOWER_BASIC_AUTH is None


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (
            "HOLD_SWEEP_SECONDS",
            "abc",
            "bad setting HOLD_SWEEP_SECONDS: Input should be a valid integer",
        ),
        (
            "HOLD_SWEEP_SECONDS",
            "0",
            "bad setting HOLD_SWEEP_SECONDS: Input should be greater than 0",
        ),
        (
            "REFUND_RETRY_CRON",
            "*/30 * * *",
            "bad setting REFUND_RETRY_CRON: Value error, expected 5 cron fields",
        ),
        ("RECONCILE_CRON", "0 25 * * *", "bad setting RECONCILE_CRON: Value error, invalid cron"),
        ("TIMEZONE", "Mars/Olympus", "bad setting TIMEZONE: Value error, unknown time zone"),
        ("DATABASE_URL", "mysql://x", "bad setting DATABASE_URL: Value error, expected a"),
        ("BROKER_URL", "amqp://x", "bad setting BROKER_URL: Value error, expected redis://"),
        (
            "FLOWER_BASIC_AUTH",
            "nocolon",
            "bad setting FLOWER_BASIC_AUTH: Value error, expected user:password",
        ),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert str(error.value).startswith(expected)
    assert "\n" not in str(error.value)


def test_a_secret_value_is_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "hunter2-no-colon")
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert "hunter2" not in str(error.value)


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-m", "celery", "-A", "workers", "worker", "--pool=solo"],
        [sys.executable, "-m", "celery", "-A", "workers", "beat"],
        [sys.executable, "-m", "workers.cli", "db", "upgrade"],
    ],
    ids=["worker", "beat", "cli"],
)
def test_a_process_with_a_bad_setting_stops_at_start_with_one_line(argv: list[str]) -> None:
    done = subprocess.run(
        argv,
        env=service_env(HOLD_SWEEP_SECONDS="soon"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "bad setting HOLD_SWEEP_SECONDS" in lines[0]


def test_celery_speaks_json_only_and_acks_late() -> None:
    conf = app.conf
    assert conf.accept_content == ["json"]
    assert conf.task_serializer == conf.result_serializer == conf.event_serializer == "json"
    assert conf.task_acks_late is True and conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_hijack_root_logger is False
    assert conf.task_protocol == 2


def test_the_four_queues_and_the_routes() -> None:
    assert [queue.name for queue in app.conf.task_queues] == list(QUEUES)
    router = app.amqp.router

    def queue_of(task_name: str) -> str:
        return router.route({}, task_name)["queue"].name

    assert queue_of("holds.expire") == "critical"
    assert queue_of("holds.sweep_expired") == "critical"
    assert queue_of("holds.expired") == "default"
    assert queue_of("refunds.submit") == "critical"
    assert queue_of("webhooks.process") == "critical"
    assert queue_of("notifications.send") == "notifications"
    assert queue_of("reconciliation.nightly") == "batch"
    assert queue_of("dlq.replay") == "default"


def test_every_countdown_stays_below_the_visibility_timeout() -> None:
    from workers.base import BackstopTask

    settings = load_settings()
    visibility = app.conf.broker_transport_options["visibility_timeout"]
    assert visibility == settings.BROKER_VISIBILITY_TIMEOUT_SECONDS == 7200
    assert max_countdown(settings) == COUNTDOWN_CEILING_SECONDS <= visibility / 2
    short = load_settings(
        BROKER_VISIBILITY_TIMEOUT_SECONDS=10,
        TASK_SOFT_TIME_LIMIT_SECONDS=3,
        TASK_TIME_LIMIT_SECONDS=4,
    )
    assert max_countdown(short) == 5
    with pytest.raises(
        SettingsError, match=r"bad setting TASK_TIME_LIMIT_SECONDS: .*second worker"
    ):
        load_settings(BROKER_VISIBILITY_TIMEOUT_SECONDS=10)
    with pytest.raises(SettingsError, match=r"bad setting TASK_SOFT_TIME_LIMIT_SECONDS: .*below"):
        load_settings(TASK_SOFT_TIME_LIMIT_SECONDS=1900)
    longest = max(BackstopTask.retry_countdown(n) for n in range(settings.TASK_MAX_RETRIES + 5))
    assert longest <= max_countdown(settings)


def test_a_countdown_past_the_longest_is_refused_before_it_is_sent() -> None:
    from datetime import UTC, datetime, timedelta

    from workers.messaging.enqueue import send

    with pytest.raises(ValueError, match="longer than the longest countdown"):
        send("holds.expire", {"hold_id": 1}, countdown=COUNTDOWN_CEILING_SECONDS + 1)
    with pytest.raises(ValueError, match="longer than the longest countdown"):
        send("holds.expire", {"hold_id": 1}, eta=datetime.now(UTC) + timedelta(hours=1))


def test_deferrals_wait_for_the_breaker_then_longer_each_time_up_to_the_cap() -> None:
    """At the defaults (a breaker open for 30 s), a task deferred all day long comes back
    ~110 times, not the 2,880 times a fixed 30 s would cost the broker."""
    import random

    from workers.base import defer_countdown

    settings = load_settings()
    rng = random.Random(1)
    reset = settings.BREAKER_RESET_SECONDS
    waits = [defer_countdown(reset, n, settings.max_countdown, rng) for n in range(200)]
    for n, wait in enumerate(waits[:5]):
        assert reset * 2**n <= wait <= reset * 2**n * 1.2
    cap = settings.max_countdown
    assert cap == COUNTDOWN_CEILING_SECONDS and 0.8 * cap <= min(waits[10:]) <= max(waits) <= cap
    assert len({round(wait) for wait in waits[10:]}) > 50  # still spread at the cap
    elapsed, deferrals = 0.0, 0
    while elapsed < settings.TASK_DEFER_MAX_SECONDS:
        elapsed += waits[deferrals]
        deferrals += 1
    assert 100 <= deferrals <= 120


def test_beat_schedule_names_registered_tasks_in_kebab_case() -> None:
    app.loader.import_default_modules()  # what a worker does: registers every task
    schedule = app.conf.beat_schedule
    assert "sweep-expired-holds" in schedule
    for entry_name, entry in schedule.items():
        assert re.fullmatch(r"[a-z]+(-[a-z]+)*", entry_name)
        assert entry["task"] in app.tasks
    sweep = schedule["sweep-expired-holds"]
    assert sweep["schedule"].total_seconds() == 5 and sweep["options"]["expires"] == 5


def test_every_public_task_has_an_explicit_dotted_name() -> None:
    app.loader.import_default_modules()
    ours = [name for name in app.tasks if not name.startswith("celery.")]
    assert set(ours) >= {
        "holds.expire",
        "holds.sweep_expired",
        "holds.expired",
        "refunds.submit",
        "refunds.check",
        "refunds.retry_stuck",
        "ops.check_schedules",
    }
    assert all(re.fullmatch(r"[a-z_]+\.[a-z_]+", name) for name in ours)


def test_schedule_windows_follow_the_schedules() -> None:
    from datetime import timedelta

    from config.schedule import beat_schedule, schedule_windows

    settings = load_settings()
    windows = schedule_windows(settings)
    assert windows["refunds.retry_stuck"] == timedelta(minutes=40)  # every 30 min + 10
    assert windows["holds.sweep_expired"] == timedelta(seconds=60)
    tasks_scheduled = {entry["task"] for entry in beat_schedule(settings).values()}
    # Every scheduled job but the checker itself has a window the checker holds it to.
    assert tasks_scheduled - {"ops.check_schedules"} == set(windows)
    daily = load_settings(REFUND_RETRY_CRON="0 9 * * 1-5")
    assert schedule_windows(daily)["refunds.retry_stuck"] == timedelta(days=3, minutes=10)


def test_config_show_says_where_each_value_came_from_and_filters_secrets(tmp_path: Any) -> None:
    import json

    (tmp_path / ".env").write_text("NOTIFY_MAX_ATTEMPTS=7\nSTRIPE_API_KEY=sk_test_fromdotenv99\n")
    env = service_env(
        TASK_MAX_RETRIES="6",
        RAZORPAY_KEY_SECRET="rzp-secret-in-env",
        BROKER_URL="redis://:broker-pass@127.0.0.1:1/0",
        BACKSTOP_VAR_DIR=str(tmp_path / "var"),
    )
    for name in ("NOTIFY_MAX_ATTEMPTS", "STRIPE_API_KEY"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "config", "show", "--json"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for secret in ("rzp-secret-in-env", "sk_test_fromdotenv99", "broker-pass"):
        assert secret not in done.stdout
    shown = json.loads(done.stdout)
    settings = {row["name"]: (row["value"], row["source"]) for row in shown["settings"]}
    assert settings["TASK_MAX_RETRIES"] == (6, "environment")
    assert settings["NOTIFY_MAX_ATTEMPTS"] == (7, ".env")
    assert settings["STRIPE_API_KEY"] == ("[Filtered]", ".env")
    assert settings["RAZORPAY_KEY_SECRET"] == ("[Filtered]", "environment")
    assert settings["BROKER_URL"] == ("redis://:[Filtered]@127.0.0.1:1/0", "environment")
    assert settings["TASK_DEFER_MAX_SECONDS"] == (86400, "default")
    assert shown["celery"]["broker_visibility_timeout"] == 7200
    assert shown["tasks"]["refunds.submit"]["max_retries"] is None
    assert shown["tasks"]["refunds.submit"]["queue"] == "critical"
