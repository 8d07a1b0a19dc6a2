"""The dead-letter triage rules, in one readable place. The first rule that matches decides.

A rule matches on the task name (a glob), the exception class, the classification recorded
with the letter, and/or a regular expression searched in the error message (where a
provider's error code shows). Its action:

- `replay`: sent again automatically, while the letter is younger than DLQ_MANUAL_AFTER_SECONDS
  and has replays left in DLQ_REPLAY_BUDGET; otherwise it goes to manual review;
- `manual`: MANUAL_REVIEW, for a person (`backstop dlq list --status MANUAL_REVIEW`);
- `discard`: DISCARDED, with the rule's reason: only where replaying can do nothing.

`reclassify` corrects the classification the worker recorded: the rule knows better (a
provider that answers "busy" with a 400). Triage applies it to every open letter the rule
matches, including letters already in manual review, so a rule added later re-sorts them.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Literal

Action = Literal["replay", "manual", "discard"]


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

    def matches(self, letter: Any) -> bool:
        """`letter` has task_name, error_type, classification and error_message."""
        return (
            fnmatch.fnmatchcase(letter.task_name, self.task)
            and (self.error_type is None or letter.error_type == self.error_type)
            and (self.classification is None or letter.classification == self.classification)
            and (self.message is None or re.search(self.message, letter.error_message) is not None)
        )


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
        message=r"razorpay [\w.]+: HTTP 400: .*(?i:server is busy|try again later)",
        reclassify="TRANSIENT",
    ),
    Rule(
        "push-token-unregistered",
        "discard",
        "the push token is unregistered (it is marked invalid): nothing can be delivered to it",
        task="notifications.*",
        message=r"(?i)unregistered",
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
