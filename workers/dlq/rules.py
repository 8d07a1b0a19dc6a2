"""The dead-letter triage rules, in one readable place. The first rule that matches decides.

A rule matches on the task name (a glob: `*` any run of characters, `?` one character), the
exception class, the classification recorded with the letter, and/or a regular expression
searched in the error message (where a provider's error code shows). Its action:

- `replay`: sent again automatically, while the letter is younger than DLQ_MANUAL_AFTER_SECONDS
  and has replays left in DLQ_REPLAY_BUDGET; otherwise it goes to manual review;
- `manual`: MANUAL_REVIEW, for a person (`backstop dlq list --status MANUAL_REVIEW`);
- `discard`: DISCARDED, with the rule's reason: only where replaying can do nothing.

Messages are matched case-insensitively, as regular expressions that Python and Postgres read
alike (keep to plain classes and alternations). `reclassify` corrects the classification the
worker recorded where the rule knows better (a provider that answers "busy" with a 400). Triage
applies it to every NEW or MANUAL_REVIEW letter the rule matches, so a rule added later
re-labels letters already in the table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import ColumnElement, and_

from workers.models import DeadLetter

Action = Literal["replay", "manual", "discard"]


def glob_regex(glob: str) -> re.Pattern[str]:
    """A task-name glob as a regular expression: `*` and `?` are its only wildcards."""
    return re.compile(
        "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in glob) + r"\Z",
        re.DOTALL,
    )


def glob_like(glob: str) -> str:
    """The same glob as a LIKE pattern, escaped with a backslash (`ESCAPE '\\'`): the `_` in
    `refunds.check_many` is a character, not a wildcard."""
    return "".join(
        "%" if c == "*" else "_" if c == "?" else "\\" + c if c in "\\%_" else c for c in glob
    )


@dataclass(frozen=True)
class Rule:
    name: str
    action: Action
    reason: str
    task: str = "*"
    error_type: str | None = None
    classification: str | None = None
    message: str | None = None
    reclassify: str | None = None

    def __post_init__(self) -> None:
        # Compiled once: triage matches every rule against up to every letter.
        object.__setattr__(self, "_task", glob_regex(self.task).match)
        pattern = re.compile(self.message, re.IGNORECASE) if self.message else None
        object.__setattr__(self, "_message", pattern.search if pattern else None)

    def matches(self, letter: Any) -> bool:
        """`letter` has task_name, error_type, classification and error_message."""
        return (
            (self.error_type is None or letter.error_type == self.error_type)
            and (self.classification is None or letter.classification == self.classification)
            and self._task(letter.task_name) is not None  # type: ignore[attr-defined]
            and (self._message is None or self._message(letter.error_message) is not None)  # type: ignore[attr-defined]
        )

    def where(self) -> ColumnElement[bool]:
        """The same match as SQL, for set-based statements (Postgres `~*`, SQLite REGEXP)."""
        conditions = [DeadLetter.task_name.like(glob_like(self.task), escape="\\")]
        if self.error_type is not None:
            conditions.append(DeadLetter.error_type == self.error_type)
        if self.classification is not None:
            conditions.append(DeadLetter.classification == self.classification)
        if self.message is not None:
            # `(?i)` leading the pattern: case-insensitive in Postgres, SQLite and Python alike.
            conditions.append(DeadLetter.error_message.regexp_match("(?i)" + self.message))
        return and_(*conditions)


RULES: tuple[Rule, ...] = (
    Rule(
        "invalid-payload",
        "manual",
        "the payload failed validation: correct it with `backstop dlq replay ID --edit`",
        error_type="PayloadError",
    ),
    Rule(
        "hold-gone",
        "discard",
        "the hold does not exist: there is nothing to expire",
        task="holds.expire",
        error_type="NotFound",
    ),
    Rule(
        "gateway-not-configured",
        "manual",
        "the gateway has no credentials: configure them, then replay",
        task="refunds.*",
        message=r"is not configured",
    ),
    Rule(
        "razorpay-busy",
        "replay",
        "Razorpay answers a busy server with HTTP 400: it is transient",
        task="refunds.*",
        message=r"razorpay [a-z_.]+: HTTP 400: .*(server is busy|try again later)",
        reclassify="TRANSIENT",
    ),
    Rule(
        "push-token-unregistered",
        "discard",
        "the push token is unregistered (it is marked invalid): nothing can be delivered to it",
        task="notifications.*",
        message=r"unregistered",
    ),
    Rule(
        "no-push-device",
        "discard",
        "the user has no registered push device: there is nowhere to deliver it",
        task="notifications.*",
        error_type="NoPushToken",
    ),
    Rule(
        "deferred-too-long",
        "manual",
        "it deferred for longer than TASK_DEFER_MAX_SECONDS (its gateway's circuit breaker "
        "stayed open, or its work stayed held elsewhere): see to the cause, then replay",
        error_type="DeferredTooLong",
    ),
    Rule(
        "transient",
        "replay",
        "a transient failure: replayed automatically while young and within its budget",
        classification="TRANSIENT",
    ),
    Rule(
        "unknown-outcome",
        "manual",
        "the outcome is unknown: check what took effect before replaying",
        classification="UNKNOWN",
    ),
    Rule(
        "permanent", "manual", "a permanent failure: it needs a person", classification="PERMANENT"
    ),
)

NO_RULE = Rule("no-rule", "manual", "no triage rule matched")


def match(letter: Any, rules: tuple[Rule, ...] = RULES) -> Rule:
    return next((rule for rule in rules if rule.matches(letter)), NO_RULE)
