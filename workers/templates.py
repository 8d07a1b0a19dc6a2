"""The notification templates: a subject and a body per name, filled from the notification's
`data` with `string.Template` placeholders (`$hold_id`). A name or placeholder we do not have
is a permanent error: sending again cannot fill it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from string import Template
from typing import Any

from workers.errors import PermanentError


class TemplateError(PermanentError):
    """The template is unknown, or its data lacks a placeholder it needs."""


@dataclass(frozen=True)
class Rendered:
    subject: str
    body: str


@dataclass(frozen=True)
class NotificationTemplate:
    subject: Template
    body: Template

    def placeholders(self) -> set[str]:
        return set(self.subject.get_identifiers()) | set(self.body.get_identifiers())


def _template(subject: str, body: str) -> NotificationTemplate:
    return NotificationTemplate(Template(subject), Template(body))


TEMPLATES: dict[str, NotificationTemplate] = {
    # holds.expired: the user whose hold lapsed; the slot is free again for the waitlist.
    "hold_expired": _template(
        "Your hold has expired",
        "Your hold on $resource_id from $start_time has expired and the slot was released.",
    ),
    "booking_confirmed": _template(
        "Booking confirmed",
        "Your booking of $resource_id from $start_time is confirmed.",
    ),
    "booking_cancelled": _template(
        "Booking cancelled",
        "Your booking of $resource_id from $start_time was cancelled.",
    ),
    "refund_processed": _template(
        "Refund processed",
        "Your refund of $amount $currency has been processed.",
    ),
    # Free text from the caller, for messages no template covers.
    "message": _template("$subject", "$body"),
}

# `workers.observability.alerts.raise_alert` writes `alert.<name>` rows for the on-call engineer.
ALERT_PREFIX = "alert."
ALERT = _template("[backstop alert] $alert_name", "$message")


def lookup(name: str) -> NotificationTemplate:
    if name in TEMPLATES:
        return TEMPLATES[name]
    if name.startswith(ALERT_PREFIX) and len(name) > len(ALERT_PREFIX):
        return ALERT
    raise TemplateError(f"unknown template {name!r}")


def missing_fields(name: str, data: Mapping[str, Any]) -> list[str]:
    """The placeholders of template `name` that `data` does not fill (raises if unknown)."""
    needed = lookup(name).placeholders() - {"alert_name"}
    return sorted(needed - set(data))


def render(name: str, data: Mapping[str, Any]) -> Rendered:
    template = lookup(name)
    if not isinstance(data, Mapping):  # a row written with plain SQL may hold anything
        raise TemplateError(f"data is a JSON {type(data).__name__}, not an object")
    values = {key: str(value) for key, value in data.items()}
    if template is ALERT:
        values["alert_name"] = name.removeprefix(ALERT_PREFIX)
    try:
        return Rendered(template.subject.substitute(values), template.body.substitute(values))
    except KeyError as missing:
        raise TemplateError(f"template {name!r} needs data field {missing.args[0]!r}") from None
    except ValueError as bad:
        raise TemplateError(f"template {name!r}: {bad}") from None
