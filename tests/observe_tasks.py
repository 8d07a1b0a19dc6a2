"""Tasks the observability tests run in real workers (`celery worker -I tests.observe_tasks`):
one that succeeds, one that fails transiently a given number of times, one that fails for good,
one that defers itself once, one that always defers, one that ignores its soft time limit, one
whose retry the broker refuses, and one whose error is full of secrets and personal data."""

from __future__ import annotations

import logging
import os
import signal
import time

import redis
from celery.exceptions import SoftTimeLimitExceeded

from config import get_settings
from workers.base import TaskContext, task
from workers.errors import Defer, PermanentError, TransientError
from workers.observability.alerts import raise_alert
from workers.payloads import Payload

log = logging.getLogger("backstop.observe_test")


class Token(Payload):
    token: str
    failures: int = 0


class Nap(Payload):
    seconds: float = 0.0


class Customer(Payload):
    card_number: str
    email: str
    phone: str
    vpa: str


def _count(token: str) -> int:
    client = redis.Redis.from_url(get_settings().BROKER_URL)
    try:
        return int(client.incr(f"observe:{token}"))
    finally:
        client.close()


@task("observe.ok", payload=Nap)
def ok(ctx: TaskContext, payload: Nap) -> str:
    time.sleep(payload.seconds)
    return "ok"


@task("observe.flaky", payload=Token)
def flaky(ctx: TaskContext, payload: Token) -> int:
    attempt = _count(payload.token)
    if attempt <= payload.failures:
        raise TransientError(f"busy, attempt {attempt}")
    return attempt


@task("observe.boom")
def boom(ctx: TaskContext) -> None:
    raise PermanentError("nothing to be done")


@task("observe.defer", payload=Token)
def defer(ctx: TaskContext, payload: Token) -> int:
    attempt = _count(payload.token)
    if attempt == 1:
        raise Defer(1, "not yet")
    return attempt


@task("observe.long", payload=Token)
def long(ctx: TaskContext, payload: Token) -> int:
    """Counts its runs and takes `failures` seconds: a task still running when the broker
    connection drops."""
    runs = _count(payload.token)
    time.sleep(payload.failures)
    return runs


@task("observe.always_defer", payload=Token)
def always_defer(ctx: TaskContext, payload: Token) -> None:
    """A gateway whose breaker never closes: counts its runs, defers every time."""
    raise Defer(0.1, f"never ready, run {_count(payload.token)}")


@task("observe.stubborn", payload=Nap)
def stubborn(ctx: TaskContext, payload: Nap) -> None:
    """Ignores its soft time limit and goes on sleeping, as code stuck in C might."""
    deadline = time.monotonic() + payload.seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except SoftTimeLimitExceeded:
            log.warning("observe.soft_limit_ignored")


@task("observe.fatal", payload=Token)
def fatal(ctx: TaskContext, payload: Token) -> None:
    """Kills the pool process running it, as a crash in native code would."""
    _count(payload.token)
    os.kill(os.getpid(), signal.SIGKILL)


@task("observe.broker_full", payload=Token)
def broker_full(ctx: TaskContext, payload: Token) -> None:
    """Fills the broker up (Redis refuses writes past `maxmemory`), then fails transiently:
    the retry this asks for cannot be published."""
    client = redis.Redis.from_url(get_settings().BROKER_URL)
    try:
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", "1")
    finally:
        client.close()
    raise TransientError(f"busy, and the broker is full ({payload.token})")


@task("observe.leak", payload=Customer)
def leak(ctx: TaskContext, payload: Customer) -> None:
    """Puts everything that must never reach Sentry where an error report would pick it up:
    locals, log lines (breadcrumbs), an alert's fields, and the exception's message."""
    settings = get_settings()
    razorpay_secret = settings.RAZORPAY_KEY_SECRET.get_secret_value()  # type: ignore[union-attr]
    stripe_key = settings.STRIPE_API_KEY.get_secret_value()  # type: ignore[union-attr]
    webhook_secret = settings.STRIPE_WEBHOOK_SECRET.get_secret_value()  # type: ignore[union-attr]
    card, email, phone, vpa = payload.card_number, payload.email, payload.phone, payload.vpa
    log.warning(
        "observe.customer",
        extra={"card": card, "contact": f"{email} {phone}", "note": f"paid by {vpa}"},
    )
    raise_alert(
        ctx.session,
        "observe_leak",
        f"customer {email} ({phone}) paid with {card} via {vpa}",
        dedupe=f"observe-leak:{ctx.task_id}",
        now=ctx.now,
        customer=email,
        detail=f"key {razorpay_secret} card {card}",
    )
    raise TransientError(
        f"gateway refused card {card} for {email}, phone {phone}, vpa {vpa}; "
        f"auth {settings.RAZORPAY_KEY_ID}:{razorpay_secret} stripe {stripe_key} "
        f"webhook {webhook_secret} live sk_live_4eC39HqLyjWDarjtT1zdp7dc"
    )
