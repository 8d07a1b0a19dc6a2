"""Exactly one beat sends the schedule: two real beat processes on the real Redis, one active
and one standby; when the active one is killed, the standby takes over within the lock's TTL."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import redis as redis_lib
from sqlalchemy import Engine

from tests import processes
from tests.conftest import service_env, wait_until

pytestmark = pytest.mark.e2e


def senders(redis: redis_lib.Redis) -> set[str]:
    """The processes that sent the sweeps waiting in `critical` (Celery's `origin` header)."""
    return {json.loads(raw)["headers"]["origin"] for raw in redis.lrange("critical", 0, -1)}


def test_two_beats_one_sends_and_the_standby_takes_over(
    committed: Engine, redis: redis_lib.Redis, tmp_path: Path
) -> None:
    env = service_env(HOLD_SWEEP_SECONDS="1", BEAT_LOCK_SECONDS="3")
    beats = []
    try:
        for name in ("a", "b"):
            beat = processes.beat(env, tmp_path / f"{name}.log", tmp_path / f"{name}-schedule")
            beats.append(beat)
        wait_until(
            lambda: all("beat.active" in b.output() or "beat.standby" in b.output() for b in beats),
            timeout=20,
        )
        active = next(b for b in beats if "beat.active" in b.output())
        standby = next(b for b in beats if b is not active)
        assert "beat.standby" in standby.output()
        wait_until(lambda: redis.llen("critical") >= 5, timeout=20)
        assert senders(redis) == {
            f"gen{active.popen.pid}@" + next(iter(senders(redis))).split("@")[1]
        }
        # The active beat dies without a goodbye: its lock expires and the standby takes over.
        active.stop(signal.SIGKILL)
        redis.delete("critical")
        wait_until(lambda: "beat.active" in standby.output(), timeout=15)
        wait_until(lambda: redis.llen("critical") >= 3, timeout=15)
        assert {origin.split("@")[0] for origin in senders(redis)} == {f"gen{standby.popen.pid}"}
    finally:
        for beat in beats:
            beat.stop()
