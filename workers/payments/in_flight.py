"""The in-flight payment janitor: payments stuck PENDING or AUTHORIZED are asked about at
their gateway on a bounded schedule, and moved when the gateway has moved on.

Kill Bill's payment janitor is the model: a payment whose outcome we never heard (the webhook
was lost, the customer closed the tab mid-redirect) is looked up a few times with growing
gaps, then left to a person. Each round claims due payments with SKIP LOCKED and books the
check (when, how often, when next) before any call, so two janitors never ask about the same
payment and a crash costs one check, never a loop; the gateways are asked concurrently with no
transaction open; the answers go through the audited transition helper, forward only.
"""

from __future__ import annotations

import logging
import time as clock_time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from workers.db import Steps, claim, transition_batch
from workers.db.transitions import MACHINES
from workers.gateways.base import (
    Gateway,
    GatewayNotFound,
    GatewayPayment,
    GatewayPermanent,
    payment_status,
)
from workers.gateways.breaker import open_seconds
from workers.gateways.fanout import fetch_payments
from workers.models import Payment
from workers.observability.alerts import raise_alert

log = logging.getLogger("backstop.janitor")

IN_FLIGHT = ("PENDING", "AUTHORIZED")
MAX_GAP = timedelta(days=1)

GatewayFor = Callable[[str], Gateway]


@dataclass(frozen=True)
class JanitorPolicy:
    stuck_after: timedelta  # in flight longer than this: ask the gateway
    max_attempts: int  # checks before the payment is left to a person, with an alert
    batch_size: int = 200
    concurrency: int = 4

    def gap(self, attempts: int) -> timedelta:
        """The wait after the `attempts`-th check: doubling from `stuck_after`, at most a day."""
        return min(self.stuck_after * 2 ** max(attempts - 1, 0), MAX_GAP)


def check_in_flight(
    steps: Steps,
    clock: Callable[[], datetime],
    gateway_for: GatewayFor,
    policy: JanitorPolicy,
    *,
    time_budget: float,
    actor: str = "payments.check_in_flight",
) -> Counter[str]:
    """Rounds of checks until nothing is due or `time_budget` seconds have passed. Gateways
    whose breaker is open, or that are not configured, are left for a later run."""
    counts: Counter[str] = Counter()
    deadline = clock_time.monotonic() + time_budget
    usable = usable_gateways(gateway_for)
    while usable:
        with steps.step("book checks") as session:  # nothing stays open during the calls
            rows = take_due(session, clock(), policy, list(usable))
        if not rows:
            break
        counts["checked"] += len(rows)
        answers: dict[str, Any] = {}
        for name in sorted({row.gateway for row in rows}):
            ids = [row.gateway_payment_id for row in rows if row.gateway == name]
            answers.update(fetch_payments(usable[name], ids, policy.concurrency))
        with steps.step("settle") as session:
            settle(session, rows, answers, clock(), policy, actor, counts)
        if len(rows) < policy.batch_size or clock_time.monotonic() >= deadline:
            break
    return counts


def usable_gateways(gateway_for: GatewayFor) -> dict[str, Gateway]:
    usable = {}
    for name in ("razorpay", "stripe"):
        try:
            gateway = gateway_for(name)
        except GatewayPermanent:
            continue  # not configured here
        if open_seconds(gateway) == 0:
            usable[name] = gateway
    return usable


def take_due(
    session: Session, now: datetime, policy: JanitorPolicy, gateways: list[str]
) -> list[Any]:
    """Claim one batch of due in-flight payments (SKIP LOCKED) and book their check."""
    due = (Payment.next_check_at.is_(None)) | (Payment.next_check_at <= now)
    rows = session.execute(
        claim(
            select(
                Payment.id,
                Payment.gateway,
                Payment.gateway_payment_id,
                Payment.status,
                Payment.amount,
                Payment.currency,
                Payment.check_attempts,
            )
            .where(
                Payment.status.in_(IN_FLIGHT),
                Payment.created_at <= now - policy.stuck_after,
                Payment.gateway_payment_id.isnot(None),
                Payment.gateway.in_(gateways),
                Payment.check_attempts < policy.max_attempts,
                due,
            )
            .order_by(Payment.created_at),
            policy.batch_size,
        )
    ).all()
    by_attempts: dict[int, list[int]] = defaultdict(list)
    for row in rows:
        by_attempts[row.check_attempts + 1].append(row.id)
    for attempts, ids in by_attempts.items():
        session.execute(
            update(Payment)
            .where(Payment.id.in_(ids))
            .values(
                last_checked_at=now,
                check_attempts=attempts,
                next_check_at=now + policy.gap(attempts),
            )
        )
    return list(rows)


def settle(
    session: Session,
    rows: list[Any],
    answers: dict[str, Any],
    now: datetime,
    policy: JanitorPolicy,
    actor: str,
    counts: Counter[str],
) -> None:
    """Move each payment the gateway has moved on, forward only and only when the amounts
    agree; alert about what needs a person."""
    moves: dict[tuple[str, str], list[int]] = defaultdict(list)
    for row in rows:
        answer = answers.get(row.gateway_payment_id)
        last_check = row.check_attempts + 1 >= policy.max_attempts
        if isinstance(answer, GatewayPayment):
            theirs = payment_status(row.gateway, answer.raw_status)
            same = row.amount == answer.amount and row.currency.upper() == answer.currency
            if theirs != row.status and not same:
                counts["amount_mismatch"] += 1
                alert(session, row, now, f"the gateway has {answer.amount} {answer.currency}")
                continue
            if row.status in MACHINES["payments"].get(theirs, frozenset()):
                moves[(row.status, theirs)].append(row.id)
                if theirs in IN_FLIGHT and last_check:
                    alert(session, row, now, f"still {theirs} after {policy.max_attempts} checks")
                continue
            counts["unchanged"] += 1
            if last_check:
                alert(session, row, now, f"still {row.status} after {policy.max_attempts} checks")
        elif isinstance(answer, GatewayNotFound):
            counts["not_found"] += 1
            if last_check:
                alert(session, row, now, "the gateway does not know this payment")
        else:
            counts["errors"] += 1  # asked again at its next check, if it has one
            if answer is not None:
                log.warning(
                    "janitor.check_failed",
                    extra={"payment_id": row.id, "error": f"{type(answer).__name__}: {answer}"},
                )
            if last_check:  # no next check: a person must hear of it now
                alert(session, row, now, f"the gateway could not be asked: {answer}")
    for (before, after), ids in moves.items():
        changed = transition_batch(
            session,
            "payments",
            select(Payment.id).where(Payment.id.in_(ids)),
            before,
            after,
            actor=actor,
            reason=f"the gateway says {after} (in-flight check)",
            now=now,
        )
        counts[after.lower()] += len(changed)


def alert(session: Session, row: Any, now: datetime, why: str) -> None:
    raise_alert(
        session,
        "payment_in_flight",
        f"payment {row.id} ({row.gateway} {row.gateway_payment_id}) is {row.status}: {why}; "
        "it needs a person",
        dedupe=f"payment-in-flight:{row.id}",
        now=now,
        payment_id=row.id,
        gateway=row.gateway,
        gateway_payment_id=row.gateway_payment_id,
    )
