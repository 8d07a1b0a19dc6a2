"""Options several commands share: who is acting; an option required unless another is given."""

from __future__ import annotations

import getpass
import os
from typing import Any

import click


def default_actor() -> str:
    return os.environ.get("BACKSTOP_ACTOR") or f"cli:{getpass.getuser()}"


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
