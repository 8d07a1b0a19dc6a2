"""The JSON payloads of the public tasks (contract section 4), validated strictly.

Strict: a JSON string is not an integer, an unknown field is an error. The same models give
other services the JSON Schema of each task.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from config.settings import EMAIL_PATTERN
from workers.errors import PayloadError
from workers.templates import TemplateError, lookup, missing_fields

Id = Annotated[int, Field(gt=0, lt=2**63)]


class Payload(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class ExpireHold(Payload):
    hold_id: Id


class SubmitRefund(Payload):
    refund_id: Id


class CheckRefund(Payload):
    refund_id: Id


class CheckRefunds(Payload):
    refund_ids: Annotated[list[Id], Field(min_length=1, max_length=1_000)]


class ReplayDeadLetter(Payload):
    dead_letter_id: Id
    actor: Annotated[str, Field(min_length=1, max_length=128)]
    reason: Annotated[str, Field(min_length=1, max_length=500)] = "replayed through dlq.replay"


class BulkDeadLetters(Payload):
    """Replay or discard every open letter a filter selects (the console's bulk actions), as
    the operator saw it: the filters' clock and the newest letter id then."""

    action: Literal["replay", "discard"]
    actor: Annotated[str, Field(min_length=1, max_length=128)]
    reason: Annotated[str, Field(min_length=1, max_length=500)]
    as_of_ms: Annotated[int, Field(gt=0)]  # the filters' clock, milliseconds since the epoch
    up_to_id: Id | None = None
    task: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    statuses: Annotated[list[str], Field(max_length=5)] = []
    error: Annotated[str, Field(min_length=1, max_length=500)] | None = None
    classification: Annotated[str, Field(min_length=1, max_length=32)] | None = None
    rule: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    older_than_seconds: Annotated[int, Field(ge=0)] | None = None
    newer_than_seconds: Annotated[int, Field(ge=0)] | None = None


class DispatchReplays(Payload):
    dead_letter_ids: Annotated[list[Id], Field(min_length=1, max_length=5_000)]


class HoldsExpired(Payload):
    hold_ids: Annotated[list[Id], Field(min_length=1, max_length=10_000)]


# Recipients per channel: an email address; an E.164 phone number; a device token, or
# `user:<id>` for every valid token the user registered in `push_tokens`.
PHONE_PATTERN = re.compile(r"\+[1-9][0-9]{6,14}")
PUSH_TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_:.\-]{8,256}")
PUSH_USER_PATTERN = re.compile(r"user:[!-~]{1,123}")
TEMPLATE_PATTERN = re.compile(r"[a-z][a-z0-9_.-]{0,127}")
DATA_MAX_BYTES = 16_384
Text = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]


def recipient_problem(channel: str, recipient: str) -> str | None:
    """Why `recipient` cannot be sent to on `channel`, or None."""
    if channel == "email":
        if len(recipient) > 254 or not EMAIL_PATTERN.fullmatch(recipient):
            return "not an email address like name@example.com"
    elif channel == "sms":
        if not PHONE_PATTERN.fullmatch(recipient):
            return "not a phone number in E.164 form like +14155550123"
    elif not (PUSH_USER_PATTERN.fullmatch(recipient) or PUSH_TOKEN_PATTERN.fullmatch(recipient)):
        return "not a push token (8-256 of [A-Za-z0-9_:.-]) nor user:<id>"
    return None


def _text_problem(value: str, path: str) -> str | None:
    if "\x00" in value:
        return f"{path} contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"{path} contains an unpaired surrogate"
    return None


def _json_problem(value: Any, path: str) -> str | None:
    """Values Postgres' jsonb refuses: NUL characters, NaN and infinities."""
    if isinstance(value, str):
        return _text_problem(value, path)
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} is not a finite number"
    if isinstance(value, dict):
        for key, item in value.items():
            problem = _json_problem(key, f"{path} key") or _json_problem(item, f"{path}.{key}")
            if problem:
                return problem
    if isinstance(value, list):
        for index, item in enumerate(value):
            problem = _json_problem(item, f"{path}[{index}]")
            if problem:
                return problem
    return None


class SendNotification(Payload):
    """`notifications.send`, contract section 4."""

    channel: Literal["email", "sms", "push"]
    recipient: Annotated[str, Field(max_length=256)]
    template: str
    data: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    dedupe_key: Text | None = None

    @field_validator("recipient")
    @classmethod
    def _recipient(cls, value: str, info: ValidationInfo) -> str:
        channel = info.data.get("channel")
        if channel is not None and (problem := recipient_problem(channel, value)):
            raise ValueError(f"{problem} for channel {channel}")
        return value

    @field_validator("dedupe_key")
    @classmethod
    def _dedupe_key(cls, value: str | None) -> str | None:
        if value is not None and (problem := _text_problem(value, "dedupe_key")):
            raise ValueError(problem)
        return value

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        if not TEMPLATE_PATTERN.fullmatch(value):
            raise ValueError("expected a template name of [a-z0-9_.-]")
        try:
            lookup(value)
        except TemplateError as unknown:
            raise ValueError(str(unknown)) from None
        return value

    @field_validator("data")
    @classmethod
    def _data(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        problem = _json_problem(value, "data")
        if problem:
            raise ValueError(problem)
        if len(json.dumps(value)) > DATA_MAX_BYTES:
            raise ValueError(f"larger than {DATA_MAX_BYTES} bytes as JSON")
        template = info.data.get("template")
        if template is not None:
            missing = missing_fields(template, value)
            if missing:
                raise ValueError(f"template {template!r} needs {', '.join(missing)}")
        return value


class DeliverNotification(Payload):
    notification_id: Id


class RunReconciliation(Payload):
    run_id: Id


class ProcessWebhook(Payload):
    # Never shown in an error message: the message is logged.
    REDACTED: ClassVar[frozenset[str]] = frozenset({"body", "signature"})

    provider: Literal["razorpay", "stripe"]
    body: Annotated[str, Field(min_length=1, max_length=1_000_000)]  # raw, as received
    signature: Annotated[str, Field(min_length=1, max_length=4_096)]  # the header's value


def describe(error: ValidationError, redacted: frozenset[str] = frozenset()) -> str:
    """One line naming every field that failed and why (the value too, unless redacted)."""
    parts = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "payload"
        message = item["msg"]
        if item["type"] not in ("missing", "extra_forbidden") and field not in redacted:
            given = item.get("input")
            message += f" (got {type(given).__name__} {given!r:.60})"
        parts.append(f"{field}: {message}")
    return "invalid payload: " + "; ".join(parts)


P = TypeVar("P", bound=Payload)


def validate(model: type[P], kwargs: dict[str, object]) -> P:
    try:
        return model.model_validate(kwargs)
    except ValidationError as exc:
        raise PayloadError(describe(exc, getattr(model, "REDACTED", frozenset()))) from None
