"""The beat scheduler: exactly one beat sends the schedule, whatever runs.

Every beat process takes a lock before it sends anything: on Redis a lock with a time-to-live
that the active beat renews on every tick (redis-py's `Lock`), so a beat that dies hands over
within BEAT_LOCK_SECONDS; on the embedded broker an exclusive file lock under BACKSTOP_VAR_DIR
(one host). A beat that does not hold it is a standby: it sends nothing and tries again every
few seconds. The jobs themselves are safe to run twice anyway (each claims its schedule slot or
its rows), so a handover at the wrong instant costs nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from typing import Any

import redis.exceptions
from celery.beat import PersistentScheduler

from config import get_settings
from config.settings import VAR_DIR
from workers.messaging.broker import broker_redis

log = logging.getLogger("backstop.beat")
LOCK_NAME = "backstop:beat"


class RedisLock:
    def __init__(self, client: Any, ttl: float) -> None:
        self.ttl = ttl
        self._lock = client.lock(LOCK_NAME, timeout=ttl, blocking=False, thread_local=False)
        self._held = False

    def hold(self) -> bool:
        """True while this process holds the lock: renewed if held, taken if free."""
        try:
            if self._held:
                self._lock.extend(self.ttl, replace_ttl=True)
            else:
                self._held = bool(self._lock.acquire(blocking=False))
        except redis.exceptions.LockError:  # expired and taken by another beat meanwhile
            self._held = False
        except redis.exceptions.RedisError as exc:
            # Without Redis no task can be sent anyway; stop sending until it is back.
            log.warning("beat.lock_unreachable", extra={"error": str(exc)[:200]})
            self._held = False
        return self._held

    def release(self) -> None:
        if self._held:
            with contextlib.suppress(Exception):  # it expires on its own anyway
                self._lock.release()
            self._held = False


class FileLock:
    def __init__(self, path: os.PathLike[str] | str) -> None:
        self.path = path
        self._fd: int | None = None

    def hold(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None


def make_lock() -> RedisLock | FileLock:
    settings = get_settings()
    client = broker_redis(settings)
    if client is not None:
        return RedisLock(client, settings.BEAT_LOCK_SECONDS)
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    return FileLock(VAR_DIR / "beat.lock")


class SingletonScheduler(PersistentScheduler):  # type: ignore[misc]
    """A PersistentScheduler that sends only while it holds the beat lock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lock = make_lock()
        self._active: bool | None = None
        super().__init__(*args, **kwargs)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        held = self._lock.hold()
        if held != self._active:
            self._active = held
            log.info("beat.active" if held else "beat.standby")
        if not held:
            return min(self.max_interval, max(1.0, get_settings().BEAT_LOCK_SECONDS / 3))
        return float(super().tick(*args, **kwargs))

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._lock.release()
