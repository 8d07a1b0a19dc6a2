"""The one settings object, read from the environment (and `.env`), as the contract lists them."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from celery.schedules import crontab
from pydantic import AfterValidator, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _project_dir() -> Path:
    """What a relative BACKSTOP_VAR_DIR (and its default, `var`) is relative to: the checkout
    the code runs from (`make run`, an editable install), so a command finds the embedded
    database from any directory; installed as a package, the current directory."""
    source = Path(__file__).resolve().parent.parent
    return source if (source / "pyproject.toml").is_file() else Path.cwd()


# The embedded database, broker, beat lock and metrics of the demo.
VAR_DIR = (_project_dir() / Path(os.environ.get("BACKSTOP_VAR_DIR", "var")).expanduser()).resolve()


class SettingsError(Exception):
    """A setting has a bad value; the message is one line naming it."""


def parse_cron(expr: str) -> crontab:
    """Turn a five-field cron expression into a Celery crontab, or fail naming what is wrong."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"expected 5 cron fields, got {len(fields)} in {expr!r}")
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    try:
        schedule = crontab(
            minute=minute,
            hour=hour,
            day_of_month=day_of_month,
            month_of_year=month_of_year,
            day_of_week=day_of_week,
        )
    except Exception as exc:  # celery raises ParseException/ValueError depending on the field
        raise ValueError(f"invalid cron expression {expr!r}: {exc}") from None
    return schedule


def _cron(value: str) -> str:
    parse_cron(value)
    return value


def _timezone(value: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r}") from None
    return value


def _basic_auth(value: str | None) -> str | None:
    if value is not None and (":" not in value or value.startswith(":")):
        raise ValueError("expected user:password")
    return value


# An address as SMTP takes it: local@domain, no spaces or angle brackets (no display name).
EMAIL_PATTERN = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*")


def _email(value: str) -> str:
    if len(value) > 254 or not EMAIL_PATTERN.fullmatch(value):
        raise ValueError("expected an email address like name@example.com")
    return value


def _optional_email(value: str | None) -> str | None:
    return None if value is None else _email(value)


# The longest countdown, whatever the visibility timeout: a retry or a deferral waits at most
# this long (15 minutes) before it runs again.
COUNTDOWN_CEILING_SECONDS = 900

Cron = Annotated[str, AfterValidator(_cron)]
PositiveInt = Annotated[int, Field(gt=0)]


class Settings(BaseSettings):
    """Every setting of the contract (section 2). Field names are the environment variables."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", case_sensitive=True, extra="ignore"
    )

    DATABASE_URL: str = f"sqlite:///{VAR_DIR / 'backstop.sqlite'}"
    BROKER_URL: str = "filesystem://"
    TIMEZONE: Annotated[str, AfterValidator(_timezone)] = "UTC"

    RAZORPAY_KEY_ID: str | None = None
    RAZORPAY_KEY_SECRET: SecretStr | None = None
    RAZORPAY_WEBHOOK_SECRET: SecretStr | None = None
    RAZORPAY_BASE_URL: str | None = None
    STRIPE_API_KEY: SecretStr | None = None
    STRIPE_WEBHOOK_SECRET: SecretStr | None = None
    STRIPE_API_BASE: str | None = None

    SENTRY_DSN: SecretStr | None = None
    SENTRY_ENVIRONMENT: str | None = None
    # Share of task runs traced as Sentry transactions; 0 sends errors and cron check-ins only.
    SENTRY_TRACES_SAMPLE_RATE: Annotated[float, Field(ge=0, le=1)] = 0.0
    # Where worker processes keep their Prometheus metrics (one subdirectory per worker node),
    # for `backstop metrics` to read.
    PROMETHEUS_MULTIPROC_DIR: Path = VAR_DIR / "metrics"
    FLOWER_BASIC_AUTH: Annotated[SecretStr | None, Field(default=None)] = None

    # The operator console (`backstop console`). Users: `name:viewer|operator:HASH` entries,
    # the hash from `backstop console hash-password`; or, behind an SSO proxy, the header it
    # sets with the user's name, believed only from CONSOLE_TRUSTED_PROXIES (addresses or
    # networks); CONSOLE_TRUSTED_OPERATORS names who of those users may act.
    CONSOLE_USERS: SecretStr | None = None
    CONSOLE_SECRET_KEY: SecretStr | None = None
    CONSOLE_TRUSTED_USER_HEADER: str | None = None
    CONSOLE_TRUSTED_PROXIES: str = ""
    CONSOLE_TRUSTED_OPERATORS: str = ""
    # Session cookies only over HTTPS; off for local development on plain http.
    CONSOLE_COOKIE_SECURE: bool = True
    CONSOLE_FLOWER_URL: str = "http://127.0.0.1:5555"

    HOLD_SWEEP_SECONDS: PositiveInt = 5
    # The active beat's lock lives this long unless renewed: a standby takes over within it.
    BEAT_LOCK_SECONDS: Annotated[int, Field(ge=3, le=600)] = 30
    HOLD_SWEEP_BATCH: PositiveInt = 1000
    REFUND_RETRY_CRON: Cron = "*/30 * * * *"
    # Gateway calls: timeout of one HTTP request; attempts (new keys) after a FAILED refund.
    GATEWAY_TIMEOUT_SECONDS: Annotated[float, Field(gt=0, le=60)] = 10.0
    REFUND_MAX_ATTEMPTS: PositiveInt = 3
    # The retry job re-checks stuck refunds in tasks of this many, each asking the gateways
    # this many at a time (threads in the worker process; the calls wait on the network).
    REFUND_CHECK_CHUNK: Annotated[int, Field(ge=1, le=1000)] = 200
    GATEWAY_CONCURRENCY: Annotated[int, Field(ge=1, le=64)] = 16
    # A gateway's circuit opens after this many failures in a row, for this long.
    BREAKER_FAIL_MAX: PositiveInt = 5
    BREAKER_RESET_SECONDS: Annotated[float, Field(gt=0)] = 30.0
    REFUND_STUCK_AFTER_SECONDS: PositiveInt = 3600
    # A PENDING refund older than this never finished its submission: the retry job resends it.
    REFUND_PENDING_AFTER_SECONDS: PositiveInt = 600
    REFUND_ESCALATE_AFTER_SECONDS: PositiveInt = 86400
    RECONCILE_CRON: Cron = "0 2 * * *"
    # The nightly run reconciles every day window of the last this many days not yet
    # reconciled (beat was down, a run failed), oldest first.
    RECONCILE_CATCHUP_DAYS: Annotated[int, Field(ge=1, le=90)] = 7
    # Gateway list requests one run has in flight (its window is paged as hourly slices).
    RECONCILE_CONCURRENCY: Annotated[int, Field(ge=1, le=32)] = 4
    # Pages of a listing compared in one query and committed together: every batch costs a
    # query, a commit and the run's progress written; a crash re-reads at most one batch.
    RECONCILE_BATCH_PAGES: Annotated[int, Field(ge=1, le=200)] = 50
    # A run is held by whoever works on it for this long, renewed with every commit; a run
    # whose worker died is resumed once this has passed.
    RECONCILE_LEASE_SECONDS: Annotated[int, Field(ge=30, le=3600)] = 300
    # The in-flight janitor: PENDING/AUTHORIZED payments with a gateway id older than this
    # are asked about at their gateway, every PAYMENT_JANITOR_SECONDS, with a backoff that
    # doubles from this value, at most PAYMENT_CHECK_MAX_ATTEMPTS times.
    PAYMENT_STUCK_AFTER_SECONDS: PositiveInt = 900
    PAYMENT_JANITOR_SECONDS: PositiveInt = 300
    PAYMENT_CHECK_MAX_ATTEMPTS: PositiveInt = 8
    NOTIFY_MAX_ATTEMPTS: PositiveInt = 5
    # Fractions of a second are accepted, for tests.
    NOTIFY_BACKOFF_SECONDS: Annotated[float, Field(gt=0)] = 60
    # Notification channels (workers/notify). Unset provider settings leave a channel off: its
    # notifications fail permanently, naming the setting, until it is set and they are replayed.
    SMTP_HOST: str | None = None
    SMTP_PORT: Annotated[int, Field(ge=1, le=65535)] = 587
    SMTP_USERNAME: str | None = None
    SMTP_PASSWORD: SecretStr | None = None
    SMTP_STARTTLS: bool = True
    NOTIFY_EMAIL_FROM: Annotated[str, AfterValidator(_email)] = "backstop@localhost"
    NOTIFY_OPS_EMAIL: Annotated[str | None, AfterValidator(_optional_email)] = None
    SMS_PROVIDER_URL: str | None = None
    SMS_PROVIDER_API_KEY: SecretStr | None = None
    PUSH_PROVIDER_URL: str | None = None
    PUSH_PROVIDER_API_KEY: SecretStr | None = None
    # One SMTP conversation or provider request, and the outbox sweep's rhythm and patience.
    NOTIFY_TIMEOUT_SECONDS: Annotated[float, Field(gt=0, le=60)] = 10.0
    NOTIFY_OUTBOX_SWEEP_SECONDS: PositiveInt = 60
    NOTIFY_OUTBOX_AFTER_SECONDS: Annotated[float, Field(ge=0)] = 300
    DLQ_TRIAGE_CRON: Cron = "*/15 * * * *"
    DLQ_MANUAL_AFTER_SECONDS: PositiveInt = 86400
    # Automatic replays of one dead letter before it goes to manual review; letters claimed
    # per triage statement; a replay with no outcome after this long goes to manual review.
    DLQ_REPLAY_BUDGET: Annotated[int, Field(ge=0)] = 3
    DLQ_TRIAGE_BATCH: Annotated[int, Field(ge=1, le=50_000)] = 5000
    DLQ_REPLAY_STALE_SECONDS: PositiveInt = 21600

    # Transient-error retries of every task: exponential from TASK_RETRY_BASE_SECONDS, capped.
    TASK_MAX_RETRIES: Annotated[int, Field(ge=0)] = 8
    TASK_RETRY_BASE_SECONDS: Annotated[float, Field(gt=0)] = 2.0
    TASK_RETRY_MAX_SECONDS: PositiveInt = 600
    # How long Redis waits before re-delivering a message a worker took but never acked (it
    # was killed). Countdowns are capped at half of it; lower it only to test redelivery.
    BROKER_VISIBILITY_TIMEOUT_SECONDS: Annotated[int, Field(ge=4)] = 7200
    # Every task's time limits. At the soft one the task gets SoftTimeLimitExceeded, a
    # transient error (retried, then dead-lettered); at the hard one its process is killed and
    # the task dead-lettered. A waiting countdown plus the hard limit stays inside the
    # visibility timeout, or Redis would hand a running task to a second worker.
    TASK_SOFT_TIME_LIMIT_SECONDS: PositiveInt = 1800
    TASK_TIME_LIMIT_SECONDS: PositiveInt = 1900
    # A task deferred while its gateway's circuit breaker is open goes to the dead-letter
    # queue (rule `deferred-too-long`) once it has waited this long: an outage that does not
    # end becomes work a person sees, not a message that circles for ever.
    TASK_DEFER_MAX_SECONDS: PositiveInt = 86400
    # A task whose worker process dies under it is put back on its queue; after this many
    # deaths (counted in Redis across workers) it is dead-lettered instead of run again.
    TASK_MAX_PROCESS_DEATHS: PositiveInt = 3
    # Messages of a batched task (`notifications.send`) one pool job runs in one transaction;
    # 1 runs each message as a task of its own.
    TASK_BATCH_MAX: Annotated[int, Field(ge=1, le=1000)] = 100
    # Per-session Postgres timeouts (milliseconds).
    DB_LOCK_TIMEOUT_MS: PositiveInt = 5_000
    DB_STATEMENT_TIMEOUT_MS: PositiveInt = 60_000
    DB_IDLE_IN_TRANSACTION_TIMEOUT_MS: PositiveInt = 120_000

    LOG_LEVEL: Annotated[str | None, Field(pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")] = None
    # Nightly retention (`ops.retention`): rows older than these are deleted, in batches.
    RETENTION_CRON: Cron = "15 3 * * *"
    RETENTION_JOB_RUNS_DAYS: PositiveInt = 30
    RETENTION_DEAD_LETTERS_DAYS: PositiveInt = 90  # closed ones only (REPLAYED, DISCARDED)
    RETENTION_WEBHOOK_EVENTS_DAYS: PositiveInt = 30  # processed ones only
    RETENTION_AUDIT_DAYS: PositiveInt = 730
    # `json` in production (docker-compose sets it), readable `text` for `make run`.
    LOG_FORMAT: Literal["text", "json"] = "text"
    # Worker processes are replaced after this many tasks or this much resident memory (KiB),
    # so a slow leak in a library never grows into an outage.
    WORKER_MAX_TASKS_PER_CHILD: Annotated[int, Field(ge=1)] = 1000
    WORKER_MAX_MEMORY_PER_CHILD_KB: Annotated[int, Field(ge=10_000)] = 400_000

    @field_validator("FLOWER_BASIC_AUTH")
    @classmethod
    def _check_basic_auth(cls, value: SecretStr | None) -> SecretStr | None:
        _basic_auth(value.get_secret_value() if value else None)
        return value

    @field_validator("DATABASE_URL")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if not value.startswith(("sqlite:", "postgresql:", "postgresql+psycopg2:")):
            raise ValueError("expected a sqlite:// or postgresql+psycopg2:// URL")
        return value

    @field_validator("BROKER_URL")
    @classmethod
    def _check_broker_url(cls, value: str) -> str:
        if not value.startswith(("filesystem://", "redis://", "rediss://", "memory://")):
            raise ValueError("expected redis://, rediss:// or filesystem://")
        return value

    @property
    def max_countdown(self) -> float:
        """The longest countdown or ETA any task may be sent with: Redis keeps a message that
        waits for its countdown unacked, so it stays well inside the visibility timeout."""
        return min(COUNTDOWN_CEILING_SECONDS, self.BROKER_VISIBILITY_TIMEOUT_SECONDS / 2)

    @property
    def broker_is_redis(self) -> bool:
        """Redis as the broker (production), not the embedded filesystem broker."""
        return self.BROKER_URL.startswith(("redis://", "rediss://"))


def load_settings(**overrides: object) -> Settings:
    """Build the settings, turning a validation error into one line that names the setting."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(part) for part in first["loc"]) or "settings"
        given = first.get("input")
        secret = any(word in name for word in ("SECRET", "KEY", "AUTH", "DSN", "PASSWORD"))
        shown = "" if secret or repr(given) in first["msg"] else f" (got {given!r})"
        raise SettingsError(f"bad setting {name}: {first['msg']}{shown}") from None
    check_limits(settings)
    return settings


def check_limits(settings: Settings) -> None:
    """Limits that are only safe together: fail naming the one to change."""
    soft, hard = settings.TASK_SOFT_TIME_LIMIT_SECONDS, settings.TASK_TIME_LIMIT_SECONDS
    if soft >= hard:
        raise SettingsError(
            f"bad setting TASK_SOFT_TIME_LIMIT_SECONDS: must be below TASK_TIME_LIMIT_SECONDS "
            f"({hard}), so a task can stop on its own before it is killed (got {soft})"
        )
    visibility = settings.BROKER_VISIBILITY_TIMEOUT_SECONDS
    if hard + settings.max_countdown >= visibility:
        raise SettingsError(
            f"bad setting TASK_TIME_LIMIT_SECONDS: a task's countdown "
            f"({settings.max_countdown:g}s at most) plus its run must end within "
            f"BROKER_VISIBILITY_TIMEOUT_SECONDS ({visibility}), or Redis hands the running "
            f"task to a second worker (got {hard})"
        )


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings; a bad value stops the process with one line on stderr."""
    try:
        return load_settings()
    except SettingsError as exc:
        raise SystemExit(f"backstop: {exc}") from None
