"""The JSON payloads of the public tasks (contract section 4), validated strictly.

Strict: a JSON string is not an integer, an unknown field is an error. The same models give
other services the JSON Schema of each task.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers.errors import PayloadError

Id = Annotated[int, Field(gt=0, lt=2**63)]


class Payload(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class ExpireHold(Payload):
    hold_id: Id


class SubmitRefund(Payload):
    refund_id: Id


class CheckRefunds(Payload):
    refund_ids: Annotated[list[Id], Field(min_length=1, max_length=1_000)]


class HoldsExpired(Payload):
    hold_ids: Annotated[list[Id], Field(min_length=1, max_length=10_000)]


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
