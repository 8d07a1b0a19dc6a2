"""Who is at the console, and what they may do.

Two ways to know the user. `CONSOLE_USERS` lists `name:role:hash` entries (the hash from
`backstop console hash-password`: scrypt, never a password); the user logs in with a form.
Or, behind an SSO proxy, `CONSOLE_TRUSTED_USER_HEADER` names the header the proxy sets (say
oauth2-proxy's `X-Forwarded-Email`), honoured only from the addresses in
`CONSOLE_TRUSTED_PROXIES`; `CONSOLE_TRUSTED_OPERATORS` names who of them may act. Two roles:
`viewer` reads, `operator` also replays and discards. The user's name is the actor of every
action they take.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Any

from werkzeug.security import check_password_hash, generate_password_hash

from config import Settings
from workers.messaging.broker import broker_redis

ROLES = ("viewer", "operator")
# A login form refuses more than this many failures per address (and per name) in the window.
LOGIN_FAILURES = 5
LOGIN_WINDOW_SECONDS = 300


class ConsoleConfigError(ValueError):
    """The console's settings cannot work; the message names the setting."""


@dataclass(frozen=True)
class User:
    name: str
    role: str

    @property
    def may_act(self) -> bool:
        return self.role == "operator"


def hash_password(password: str) -> str:
    return generate_password_hash(password, method="scrypt")


def parse_users(text: str) -> dict[str, tuple[str, str]]:
    """`CONSOLE_USERS`: `name:role:hash` entries separated by commas or whitespace."""
    users: dict[str, tuple[str, str]] = {}
    for entry in text.replace(",", " ").split():
        name, _, rest = entry.partition(":")
        role, _, hashed = rest.partition(":")
        if not name or role not in ROLES or not hashed.startswith(("scrypt:", "pbkdf2:")):
            raise ConsoleConfigError(
                f"CONSOLE_USERS: bad entry for {name or '?'!r}: expected name:viewer|operator:HASH "
                "with a hash from `backstop console hash-password`"
            )
        users[name] = (role, hashed)
    return users


@dataclass(frozen=True)
class Authority:
    """The console's users, from the settings."""

    users: dict[str, tuple[str, str]]
    header: str | None
    proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    operators: frozenset[str]

    @classmethod
    def from_settings(cls, settings: Settings) -> Authority:
        users_text = settings.CONSOLE_USERS.get_secret_value() if settings.CONSOLE_USERS else ""
        users = parse_users(users_text)
        header = settings.CONSOLE_TRUSTED_USER_HEADER or None
        try:
            proxies = tuple(
                ipaddress.ip_network(item.strip(), strict=False)
                for item in settings.CONSOLE_TRUSTED_PROXIES.split(",")
                if item.strip()
            )
        except ValueError as exc:
            raise ConsoleConfigError(f"CONSOLE_TRUSTED_PROXIES: {exc}") from None
        if header and not proxies:
            raise ConsoleConfigError(
                "CONSOLE_TRUSTED_USER_HEADER needs CONSOLE_TRUSTED_PROXIES: the addresses of "
                "the proxies whose header is believed"
            )
        if not users and not header:
            raise ConsoleConfigError(
                "the console needs CONSOLE_USERS (name:role:hash, see `backstop console "
                "hash-password`) or CONSOLE_TRUSTED_USER_HEADER with CONSOLE_TRUSTED_PROXIES"
            )
        operators = frozenset(
            item.strip() for item in settings.CONSOLE_TRUSTED_OPERATORS.split(",") if item.strip()
        )
        return cls(users, header, proxies, operators)

    def check_password(self, name: str, password: str) -> User | None:
        found = self.users.get(name)
        if found is None:
            check_password_hash(DUMMY_HASH, password)  # the same time for a name we do not know
            return None
        role, hashed = found
        return User(name, role) if check_password_hash(hashed, password) else None

    def from_proxy(self, remote_addr: str | None, headers: Any) -> User | None:
        """The user the trusted proxy names, if the request came from one."""
        if not self.header or not remote_addr:
            return None
        try:
            address = ipaddress.ip_address(remote_addr)
        except ValueError:
            return None
        if not any(address in network for network in self.proxies):
            return None
        name = (headers.get(self.header) or "").strip()
        if not name or len(name) > 128:
            return None
        return User(name, "operator" if name in self.operators else "viewer")


DUMMY_HASH = generate_password_hash("not a password", method="scrypt")


class LoginThrottle:
    """Failed logins counted per key (an address, a name) over a window: in the broker's Redis
    when there is one, so every console process shares the count; in this process otherwise."""

    def __init__(self, settings: Settings) -> None:
        self.redis = broker_redis(settings, timeout=2)
        self.local: dict[str, list[float]] = {}

    def blocked(self, *keys: str) -> bool:
        return any(self.count(key) >= LOGIN_FAILURES for key in keys)

    def count(self, key: str) -> int:
        if self.redis is not None:
            try:
                return int(self.redis.get(f"backstop:console:login:{key}") or 0)
            except Exception:  # Redis away: fall back to this process's count
                pass
        now = time.monotonic()
        recent = [t for t in self.local.get(key, []) if now - t < LOGIN_WINDOW_SECONDS]
        self.local[key] = recent
        return len(recent)

    def failed(self, *keys: str) -> None:
        for key in keys:
            self.local.setdefault(key, []).append(time.monotonic())
            if self.redis is not None:
                try:
                    name = f"backstop:console:login:{key}"
                    with self.redis.pipeline() as pipe:
                        pipe.incr(name).expire(name, LOGIN_WINDOW_SECONDS).execute()
                except Exception:
                    pass
