"""Options several commands share: who is acting."""

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
