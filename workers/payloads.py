"""The JSON payloads of the public tasks (contract section 4), validated strictly.

Strict: a JSON string is not an integer, an unknown field is an error. The same models give
other services the JSON Schema of each task.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

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


class ReplayDeadLetter(Payload):
    dead_letter_id: Id
    actor: Annotated[str, Field(min_length=1, max_length=128)]
    reason: Annotated[str, Field(min_length=1, max_length=500)] = "replayed through dlq.replay"


class DispatchReplays(Payload):
    dead_letter_ids: Annotated[list[Id], Field(min_length=1, max_length=5_000)]


class HoldsExpired(Payload):
    hold_ids: Annotated[list[Id], Field(min_length=1, max_length=10_000)]


def describe(error: ValidationError) -> str:
    """One line naming every field that failed and why."""
    parts = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "payload"
        message = item["msg"]
        if item["type"] not in ("missing", "extra_forbidden"):
            given = item.get("input")
            message += f" (got {type(given).__name__} {given!r:.60})"
        parts.append(f"{field}: {message}")
    return "invalid payload: " + "; ".join(parts)


P = TypeVar("P", bound=Payload)


def validate(model: type[P], kwargs: dict[str, object]) -> P:
    try:
        return model.model_validate(kwargs)
    except ValidationError as exc:
        raise PayloadError(describe(exc)) from None
