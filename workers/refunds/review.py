"""Refunds that need a person, for the console and `backstop refunds`: the list an operator
works through (in manual review, or stuck PENDING or PROCESSING past REFUND_STUCK_AFTER_SECONDS),
one refund's whole story, and what an operator may do about one:

- re-check it at the gateway now (`check_refunds`, as `refunds.check` does, here also for a
  refund in manual review or one still PENDING, whose submission may have reached the gateway);
- send it again (`refunds.submit`): a FAILED refund with a new key, as the retry job does; a
  PENDING one with its own key, which the submission looks up at the gateway before sending
  again; never a PROCESSING one, already at the gateway (re-check that), and never a new key
  while an outcome may be at the gateway, which could refund twice;
- mark it resolved, with a reason: it stays out of the retry job's and the escalation's
  hands for good (`requires_manual_review` stays set) and leaves the list.

Each is audited in `state_transitions` with the operator's name and reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from workers.db import Steps, audited_update
from workers.errors import NotFound, PermanentError
from workers.messaging.enqueue import enqueue_after_commit
from workers.models import Payment, Refund, StateTransition
from workers.refunds.checks import check_refunds
from workers.refunds.retries import start_attempts
from workers.refunds.submission import SUPERSEDED, GatewayFor


class RefundActionError(PermanentError):
    """An operator asked for something this refund cannot have (a new attempt while its outcome
    is unknown): the message says why and what to do instead."""


COLUMNS = (
    Refund.id,
    Refund.payment_id,
    Refund.amount,
    Refund.currency,
    Refund.reason,
    Refund.status,
    Refund.requires_manual_review,
    Refund.attempts,
    Refund.idempotency_key,
    Refund.gateway_refund_id,
    Refund.last_error,
    Refund.key_sent_at,
    Refund.in_flight_until,
    Refund.resolved_at,
    Refund.resolution,
    Refund.created_at,
    Refund.updated_at,
    Payment.gateway,
    Payment.gateway_payment_id,
)


def needing_a_person(now: datetime, stuck_after: timedelta) -> Select[Any]:
    """Refunds not COMPLETED and not resolved that are in manual review, or PENDING or
    PROCESSING with no change for `stuck_after`."""
    stuck = Refund.status.in_(("PENDING", "PROCESSING")) & (Refund.updated_at <= now - stuck_after)
    return (
        select(*COLUMNS)
        .join(Payment, Payment.id == Refund.payment_id)
        .where(
            Refund.status != "COMPLETED",
            Refund.resolved_at.is_(None),
            Refund.requires_manual_review.is_(True) | stuck,
        )
    )


def page_query(query: Select[Any], *, limit: int, after: int = 0) -> Select[Any]:
    """Up to `limit` of them from above id `after`, in id order (keyset: no OFFSET)."""
    return query.where(Refund.id > after).order_by(Refund.id).limit(limit)


def page(session: Session, query: Select[Any], *, limit: int, after: int = 0) -> list[Any]:
    return list(session.execute(page_query(query, limit=limit, after=after)).all())


def count(session: Session, query: Select[Any]) -> int:
    return int(session.execute(select(func.count()).select_from(query.subquery())).scalar_one())


@dataclass
class RefundStory:
    refund: Any  # the row, with its payment's gateway and id
    history: list[dict[str, Any]]


def story(session: Session, refund_id: int) -> RefundStory:
    row = session.execute(
        select(*COLUMNS)
        .join(Payment, Payment.id == Refund.payment_id)
        .where(Refund.id == refund_id)
    ).first()
    if row is None:
        raise NotFound(f"refund {refund_id} does not exist")
    history = [
        {
            "at": item.at,
            "what": f"{item.from_status} -> {item.to_status}",
            "actor": item.actor,
            "reason": item.reason,
        }
        for item in session.scalars(
            select(StateTransition)
            .where(StateTransition.entity == "refunds", StateTransition.entity_id == refund_id)
            .order_by(StateTransition.at, StateTransition.id)
        )
    ]
    return RefundStory(row, history)


def recheck(
    steps: Steps,
    refund_id: int,
    clock: Callable[[], datetime],
    gateway_for: GatewayFor,
    *,
    actor: str,
) -> str:
    """Ask the refund's gateway about it now and record a final answer (audited as `actor`),
    in the transaction the caller commits. Returns what happened, in a line."""
    with steps.step("read") as session:
        before = story(session, refund_id).refund.status
    if before not in ("PENDING", "PROCESSING"):
        return f"refund {refund_id} is {before}: nothing to ask the gateway"
    checked = check_refunds(
        steps,
        [refund_id],
        clock,
        gateway_for,
        actor=actor,
        asking=("PENDING", "PROCESSING"),
        include_review=True,
    )
    if refund_id in checked.deferred:
        return f"refund {refund_id}: its gateway's circuit breaker is open; try again shortly"
    error = checked.retry.get(refund_id) or checked.failed.get(refund_id)
    if error is not None:
        return f"refund {refund_id}: the gateway could not say ({type(error).__name__}: {error})"
    after = checked.statuses[refund_id]
    if after == before:
        return f"refund {refund_id} is still {after}: the gateway has no final answer"
    return f"refund {refund_id}: {before} -> {after} (the gateway's answer)"


def new_attempt(session: Session, refund_id: int, *, actor: str, reason: str, now: datetime) -> str:
    """Send the refund again, once the session commits, out of manual review. A FAILED refund
    gets a new key (never one the gateway has seen). A PENDING one keeps its key: the
    submission asks the gateway about a key it sent before sending it again, so an outcome
    already there is found, not made twice. A PROCESSING refund is at the gateway already
    (re-check it); a COMPLETED one is done."""
    if not reason.strip():
        raise RefundActionError("a new attempt needs a reason")
    # Locked: a resolve (or another new attempt) at the same moment waits, then sees this one.
    session.execute(select(Refund.id).where(Refund.id == refund_id).with_for_update())
    row = story(session, refund_id).refund
    if row.resolved_at is not None:
        raise RefundActionError(f"refund {refund_id} was resolved: {row.resolution}")
    if (row.last_error or "").startswith(SUPERSEDED):
        raise RefundActionError(
            f"refund {refund_id}: {row.last_error}; check the payment's refunds at the gateway, "
            "then resolve it: a new attempt could refund twice"
        )
    if row.status == "FAILED":
        moved = start_attempts(
            session,
            [(refund_id, row.gateway_refund_id)],
            actor=actor,
            now=now,
            reason=f"new attempt by {actor}: {reason}",
            values={"requires_manual_review": False, "last_retry_at": now, "reviewed_at": now},
        )
        if not moved:
            raise RefundActionError(f"refund {refund_id} changed meanwhile: look at it again")
        said = "FAILED -> PENDING with a new key"
    elif row.status == "PENDING":
        sent = audited_update(
            session,
            "refunds",
            refund_id,
            actor=actor,
            reason=f"sent again with its key by {actor}: {reason}",
            now=now,
            values={"requires_manual_review": False, "last_retry_at": now, "reviewed_at": now},
            guard=Refund.status == "PENDING",
        )
        if not sent:
            raise RefundActionError(f"refund {refund_id} changed meanwhile: look at it again")
        said = "PENDING, sent again with its key (the gateway is asked first if it was sent)"
    elif row.status == "PROCESSING":
        raise RefundActionError(
            f"refund {refund_id} is PROCESSING: the gateway has it; re-check it instead"
        )
    else:
        raise RefundActionError(f"refund {refund_id} is already {row.status}")
    enqueue_after_commit(session, "refunds.submit", {"refund_id": refund_id})
    return f"refund {refund_id}: {said}; refunds.submit sent"


def resolve(session: Session, refund_id: int, *, actor: str, reason: str, now: datetime) -> str:
    """The refund no longer needs a person (refunded another way, or confirmed at the gateway's
    dashboard): resolved, with the reason, in its audit trail; it stays in manual review, so
    no automatic retry or escalation takes it again."""
    if not reason.strip():
        raise RefundActionError("resolving a refund needs a reason")
    changed = audited_update(
        session,
        "refunds",
        refund_id,
        actor=actor,
        reason=f"manual review resolved: {reason}",
        now=now,
        values={"resolved_at": now, "resolution": reason, "reviewed_at": now},
        guard=Refund.requires_manual_review.is_(True) & Refund.resolved_at.is_(None),
    )
    if not changed:
        raise RefundActionError(
            f"refund {refund_id} is not waiting in manual review: nothing to resolve"
        )
    return f"refund {refund_id}: resolved"
