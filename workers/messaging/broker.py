"""The broker's Redis, for what shares state between processes through it (breakers, the beat
lock, the notification pump's kick): `None` on the embedded broker, which has no Redis."""

from __future__ import annotations

from typing import Any

import redis

from config import Settings


def broker_redis(settings: Settings, timeout: float = 5.0) -> Any | None:
    """A redis-py client on BROKER_URL with `timeout` for connecting and for every command, or
    None when the broker is not Redis."""
    if not settings.broker_is_redis:
        return None
    return redis.Redis.from_url(
        settings.BROKER_URL, socket_timeout=timeout, socket_connect_timeout=timeout
    )
