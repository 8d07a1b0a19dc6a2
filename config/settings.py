"""The one settings object, read from the environment (and `.env`), as the contract lists them."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated

from celery.schedules import crontab
from pydantic import AfterValidator, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

VAR_DIR = Path(os.environ.get("BACKSTOP_VAR_DIR", "var")).resolve()


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
    FLOWER_BASIC_AUTH: Annotated[SecretStr | None, Field(default=None)] = None

    HOLD_SWEEP_SECONDS: PositiveInt = 5
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
    NOTIFY_BACKOFF_SECONDS: PositiveInt = 60
    DLQ_TRIAGE_CRON: Cron = "*/15 * * * *"
    DLQ_MANUAL_AFTER_SECONDS: PositiveInt = 86400

    # Transient-error retries of every task: exponential from TASK_RETRY_BASE_SECONDS, capped.
    TASK_MAX_RETRIES: Annotated[int, Field(ge=0)] = 8
    TASK_RETRY_BASE_SECONDS: Annotated[float, Field(gt=0)] = 2.0
    TASK_RETRY_MAX_SECONDS: PositiveInt = 600
    # How long Redis waits before re-delivering a message a worker took but never acked (it
    # was killed). Countdowns are capped at half of it; lower it only to test redelivery.
    BROKER_VISIBILITY_TIMEOUT_SECONDS: Annotated[int, Field(ge=4)] = 7200
    # Per-session Postgres timeouts (milliseconds).
    DB_LOCK_TIMEOUT_MS: PositiveInt = 5_000
    DB_STATEMENT_TIMEOUT_MS: PositiveInt = 60_000
    DB_IDLE_IN_TRANSACTION_TIMEOUT_MS: PositiveInt = 120_000

    LOG_LEVEL: Annotated[str | None, Field(pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")] = None

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


def load_settings(**overrides: object) -> Settings:
    """Build the settings, turning a validation error into one line that names the setting."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(part) for part in first["loc"]) or "settings"
        given = first.get("input")
        secret = any(word in name for word in ("SECRET", "KEY", "AUTH", "DSN"))
        shown = "" if secret or repr(given) in first["msg"] else f" (got {given!r})"
        raise SettingsError(f"bad setting {name}: {first['msg']}{shown}") from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings; a bad value stops the process with one line on stderr."""
    try:
        return load_settings()
    except SettingsError as exc:
        raise SystemExit(f"backstop: {exc}") from None
