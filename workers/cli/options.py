"""Options several commands share: who is acting, where a server listens; an option required
unless another is given."""

from __future__ import annotations

import getpass
import os
from typing import Any

import click


def default_actor() -> str:
    return os.environ.get("BACKSTOP_ACTOR") or f"cli:{getpass.getuser()}"


def listen_options(port: int, env: str | None = None) -> Any:
    """--address and --port of a command that serves HTTP, spelled as Flower and the Procfile
    spell them; --host, the simulator's old spelling, still works. `env` (CONSOLE, METRICS)
    reads them from ENV_ADDRESS and ENV_PORT too."""

    def add(func: Any) -> Any:
        func = click.option(
            "--port",
            default=port,
            show_default=True,
            type=click.IntRange(1, 65535),
            envvar=f"{env}_PORT" if env else None,
            show_envvar=bool(env),
            help="The port to listen on.",
        )(func)
        return click.option(
            "--address",
            "--host",
            "address",
            default="127.0.0.1",
            show_default=True,
            envvar=f"{env}_ADDRESS" if env else None,
            show_envvar=bool(env),
            help="The address to listen on.",
        )(func)

    return add


def actor_option(func: Any) -> Any:
    """--actor: the name every action is audited under."""
    return click.option(
        "--actor", default=default_actor, show_default="$BACKSTOP_ACTOR or cli:$USER"
    )(func)


class RequiredUnless(click.Option):
    """An option a command needs unless another one is given, which click's `required` cannot
    express; its help says so as click marks a required one: `[required unless --show]`. The
    command itself refuses to run without either."""

    def __init__(self, *args: Any, unless: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unless = unless

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        record = super().get_help_record(ctx)
        if record is None:
            return None
        spec, text = record
        return spec, f"{text}  [required unless {self.unless}]".lstrip()
