"""Run a command beside a private PostgreSQL and a private Redis, then stop both.

    python -m tests.services -- pytest -q

Both listen on free loopback ports in a fresh temporary directory and are stopped by PID when the
command ends, whatever its outcome. PostgreSQL refuses to run as root, so when run as root the
cluster belongs to the unprivileged `postgres` user. The command sees DATABASE_URL and BROKER_URL.

    python -m tests.services --find-postgres

prints the folder of the PostgreSQL server binaries it would use, or says on one line what is
missing and exits 1 (`make test` then installs the server with apt).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# What the harness runs of PostgreSQL, all from one installation.
PG_TOOLS = ("initdb", "postgres", "pg_isready", "createdb")


class MissingPostgres(Exception):
    """No PostgreSQL server installation the harness can run."""


def _major(folder: Path) -> tuple[int, ...]:
    """`/usr/lib/postgresql/15/bin` -> (15,); Debian installs each major side by side."""
    return tuple(int(part) for part in folder.parent.name.split(".") if part.isdigit())


def _candidates(debian: Path = Path("/usr/lib/postgresql")) -> list[Path]:
    """Where to look, in order: PG_BINDIR when set (and nowhere else), `pg_config --bindir`,
    Debian's /usr/lib/postgresql/<major>/bin newest major first, then PATH."""
    if os.environ.get("PG_BINDIR"):
        return [Path(os.environ["PG_BINDIR"])]
    found: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        # Debian's pg_config (libpq-dev) names the server's folder even when no server is
        # installed, so every candidate is checked for the tools themselves.
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            answer = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10
            )
            if answer.returncode == 0 and answer.stdout.strip():
                found.append(Path(answer.stdout.strip()))
    found += sorted(debian.glob("*/bin"), key=_major, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        found.append(Path(initdb).resolve().parent)
    return list(dict.fromkeys(found))


@functools.cache
def find_postgres() -> Path:
    """The folder holding every tool of PG_TOOLS, or MissingPostgres saying where it looked."""
    looked = _candidates()
    for folder in looked:
        if all(os.access(folder / tool, os.X_OK) for tool in PG_TOOLS):
            if os.geteuid() == 0:
                try:
                    pwd.getpwnam("postgres")
                except KeyError:
                    raise MissingPostgres(
                        f"PostgreSQL is in {folder} but there is no `postgres` user to run it "
                        "as (Postgres refuses root)"
                    ) from None
            return folder
    if os.environ.get("PG_BINDIR"):
        where = f"PG_BINDIR={os.environ['PG_BINDIR']}"
    else:
        where = ", ".join([*map(str, looked), "/usr/lib/postgresql/*/bin", "PATH"])
    raise MissingPostgres(
        f"no PostgreSQL server ({', '.join(PG_TOOLS)}) in {where}; `make test` installs "
        "it with apt (Debian 12: postgresql-15), or set PG_BINDIR"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pg_tool(name: str) -> str:
    try:
        return str(find_postgres() / name)
    except MissingPostgres as exc:
        raise SystemExit(f"services: {exc}") from None


def _as_postgres() -> dict[str, object]:
    """Popen arguments that run a child as `postgres` when we are root; the child's PID is then
    the server's own, so it can be stopped by PID."""
    if os.geteuid() != 0:
        return {}
    return {"user": "postgres", "group": "postgres", "extra_groups": []}


def _wait_for_port(port: int, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise SystemExit(f"services: {what} did not start on port {port} within {timeout:.0f}s")


@contextlib.contextmanager
def postgres(root: Path) -> Iterator[str]:
    data, sockets = root / "pgdata", root / "pgsock"
    sockets.mkdir()
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(root, entry.pw_uid, entry.pw_gid)
        os.chown(sockets, entry.pw_uid, entry.pw_gid)
    port = _free_port()
    subprocess.run(
        [
            _pg_tool("initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        cwd=root,
        **_as_postgres(),
    )
    options = (
        f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
        "-c shared_buffers=256MB"
    )
    log = root / "postgres.log"
    server = subprocess.Popen(
        [_pg_tool("postgres"), "-D", str(data), *options.split()],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=root,
        **_as_postgres(),
    )
    try:
        _wait_for_port(port, "postgres")
        for _ in range(100):
            ready = subprocess.run(
                [_pg_tool("pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"],
                stdout=subprocess.DEVNULL,
            )
            if ready.returncode == 0:
                break
            time.sleep(0.1)
        subprocess.run(
            [
                _pg_tool("createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "postgres",
                "backstop",
            ],
            check=True,
        )
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/backstop"
    finally:
        _stop(server, signal.SIGINT)  # postgres' "fast" shutdown


@contextlib.contextmanager
def redis(root: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if not binary:
        raise SystemExit("services: redis-server not found; `make test` installs it with apt")
    port = _free_port()
    folder = root / "redis"
    folder.mkdir()
    server = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(folder),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ],
        stdout=(root / "redis.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_for_port(port, "redis")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(server, signal.SIGTERM)


def _stop(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main(argv: list[str]) -> int:
    if argv == ["--find-postgres"]:
        try:
            print(find_postgres())
        except MissingPostgres as exc:
            print(f"services: {exc}", file=sys.stderr)
            return 1
        return 0
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("usage: python -m tests.services -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="backstop-services-"))
    os.chmod(root, 0o755)
    try:
        with postgres(root) as database_url, redis(root) as broker_url:
            env = {
                **os.environ,
                "DATABASE_URL": database_url,
                "BROKER_URL": broker_url,
                "POSTGRES_LOG": str(root / "postgres.log"),
            }
            print(f"services: postgres {database_url}  redis {broker_url}", flush=True)
            child = subprocess.Popen(argv, env=env)
            try:
                return child.wait()
            except KeyboardInterrupt:
                child.send_signal(signal.SIGINT)
                return child.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
