"""What every benchmark shares: the services it needs, the machine it ran on and the servers it
measured, and how a target reads."""

from __future__ import annotations

import os
import platform
from typing import Any

import redis
from sqlalchemy import Engine, text

POSTGRES_SETTINGS = ("fsync", "synchronous_commit", "shared_buffers", "max_connections")


def machine(engine: Engine, broker: redis.Redis) -> dict[str, Any]:
    with engine.connect() as conn:
        version = conn.execute(text("SELECT version()")).scalar()
        settings = {name: conn.execute(text(f"SHOW {name}")).scalar() for name in POSTGRES_SETTINGS}
    info = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postgres": version,
        "postgres_settings": settings,
        "redis": broker.info("server")["redis_version"],
        "loadavg": os.getloadavg(),
    }
    print(f"machine:  {info['cpus']} CPUs, {info['platform']}, Python {info['python']}")
    # Anything else running competes for the same CPUs and shows up as noise in every number.
    print("load:     {:.2f} {:.2f} {:.2f} (1/5/15 min, before the bench)".format(*info["loadavg"]))
    print(f"postgres: {version}")
    # The throwaway server trades durability for speed; every commit is cheaper than in prod.
    print("          " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    print(f"redis:    {info['redis']}")
    return info


def service_urls() -> tuple[str, str] | None:
    """The private PostgreSQL and Redis `make bench` starts, or None (said on stdout)."""
    url, broker_url = os.environ.get("DATABASE_URL"), os.environ.get("BROKER_URL")
    if not url or not url.startswith("postgresql") or not broker_url:
        print("bench: needs PostgreSQL DATABASE_URL and BROKER_URL; run `make bench`")
        return None
    return url, broker_url


def scalar(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(sql), params).scalar()


def settle(engine: Engine, tables: str = "") -> None:
    """After a load: `VACUUM ANALYZE` (these tables, or all) and a CHECKPOINT, so that every
    run starts from the same planner statistics and no pending writes."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f"VACUUM ANALYZE {tables}".rstrip()))
        conn.execute(text("CHECKPOINT"))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"
