"""The configured gateway adapters, one per process (HTTP sessions do not survive a fork)."""

from __future__ import annotations

import os

from config import Settings, get_settings
from workers.gateways.base import Gateway, GatewayPermanent
from workers.gateways.breaker import Breakers, GuardedGateway
from workers.gateways.razorpay import RazorpayGateway
from workers.gateways.stripe import StripeGateway
from workers.messaging.broker import broker_redis

_cache: dict[tuple[int, str], Gateway] = {}


def get_gateway(name: str) -> Gateway:
    """The adapter for `name`, built from settings; a gateway without credentials is a
    permanent error naming the settings to set."""
    key = (os.getpid(), name)
    if key not in _cache:
        _cache[key] = _build(name)
    return _cache[key]


def _build(name: str) -> Gateway:
    settings = get_settings()
    adapter = _adapter(name, settings)  # first: a gateway without credentials says so
    breakers = Breakers(
        name,
        fail_max=settings.BREAKER_FAIL_MAX,
        reset_seconds=settings.BREAKER_RESET_SECONDS,
        redis=broker_redis(settings),
    )
    return GuardedGateway(adapter, breakers)


def _adapter(name: str, settings: Settings) -> Gateway:
    timeout = settings.GATEWAY_TIMEOUT_SECONDS
    if name == "razorpay":
        if not (settings.RAZORPAY_KEY_ID and settings.RAZORPAY_KEY_SECRET):
            raise GatewayPermanent(
                "razorpay is not configured: set RAZORPAY_KEY_ID and RAZORPAY_KEY_SECRET"
            )
        return RazorpayGateway(
            settings.RAZORPAY_KEY_ID,
            settings.RAZORPAY_KEY_SECRET.get_secret_value(),
            settings.RAZORPAY_BASE_URL,
            timeout,
            connections=max(10, settings.GATEWAY_CONCURRENCY),
        )
    if name == "stripe":
        if not settings.STRIPE_API_KEY:
            raise GatewayPermanent("stripe is not configured: set STRIPE_API_KEY")
        return StripeGateway(
            settings.STRIPE_API_KEY.get_secret_value(),
            settings.STRIPE_API_BASE,
            timeout,
            connections=max(10, settings.GATEWAY_CONCURRENCY),
        )
    raise GatewayPermanent(f"unknown gateway {name!r}")


def forget_gateways() -> None:
    """Drop the adapters (after settings change in tests)."""
    _cache.clear()


def breaker_states() -> dict[str, str]:
    """The breaker state of every configured gateway (closed, open or half-open)."""
    states = {}
    for name in ("razorpay", "stripe"):
        try:
            gateway = get_gateway(name)
            states[name] = gateway.state() if isinstance(gateway, GuardedGateway) else "n/a"
        except GatewayPermanent:
            states[name] = "not configured"
        except Exception as exc:  # the breaker's Redis is unreachable
            states[name] = f"unknown ({type(exc).__name__}: {exc})"[:200]
    return states
