"""Re-checking refunds at their gateway (`refunds.check`, `refunds.check_many`): a PROCESSING
refund, or one whose outcome is unknown, is looked up by its gateway id or our reference, many
at a time on the per-process gateway pool, and its answer recorded as a submission's would be.
Refunds whose gateway's breaker is open wait for it; those that cannot be asked about get their
own dead letters."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from workers.db import Steps, transition_batch
from workers.dead_letters import record_dead_letter
from workers.errors import (
    Defer,
    NotFound,
    classify,
    one_line,
)
from workers.gateways.base import (
    CircuitOpen,
    Gateway,
    GatewayPermanent,
    GatewayRefund,
    GatewayTransient,
    OutcomeUnknown,
    RefundRequest,
)
from workers.gateways.breaker import open_seconds
from workers.gateways.fanout import thread_pool
from workers.messaging.enqueue import enqueue_after_commit
from workers.models import Payment, Refund
from workers.refunds.submission import GatewayFor, record_outcome

log = logging.getLogger("backstop.refunds")


@dataclass
class Checked:
    """What one round of gateway re-checks found, refund by refund."""

    statuses: dict[int, str] = field(default_factory=dict)  # status afterwards, moved or not
    retry: dict[int, Exception] = field(default_factory=dict)  # no answer yet: ask again later
    failed: dict[int, Exception] = field(default_factory=dict)  # cannot be asked: dead letter
    deferred: dict[int, float] = field(default_factory=dict)  # breaker open: seconds to wait

    def outcome(self, refund_id: int) -> str:
        """One refund's status afterwards, or its failure raised as the task's own."""
        if refund_id in self.deferred:
            raise Defer(self.deferred[refund_id], f"refunds {refund_id}: circuit breaker is open")
        error = self.retry.get(refund_id) or self.failed.get(refund_id)
        if error is not None:
            raise error
        return self.statuses[refund_id]

    def counts(self) -> dict[str, int]:
        counts = {"completed": 0, "failed": 0, "processing": 0}
        for status in self.statuses.values():
            key = status.lower()
            counts[key if key in counts else "processing"] += 1
        counts.update(retry=len(self.retry), errors=len(self.failed), deferred=len(self.deferred))
        return counts


def check_refunds(
    steps: Steps,
    refund_ids: Sequence[int],
    clock: Callable[[], datetime],
    gateway_for: GatewayFor,
    *,
    concurrency: int = 1,
    actor: str = "refunds.check",
    asking: tuple[str, ...] = ("PROCESSING",),
    include_review: bool = False,
) -> Checked:
    """Ask the gateways about PROCESSING refunds and move on each one they have a final answer
    for. The rows are read in one select and that transaction ends before any call; the calls
    run `concurrency` at a time; the answers are written with one audited batch transition per
    outcome, in the transaction the caller commits (with what it adds to them). Refunds that are
    no longer PROCESSING, or are in manual review, are reported as they are and not asked
    about. An operator's re-check (`include_review`, `asking` PENDING too) asks about a refund
    in manual review, or one whose submission may or may not have reached the gateway."""
    with steps.step("read") as session:  # nothing stays open while the gateways answer
        rows = read_refunds(session, refund_ids)
    checked = Checked()
    for refund_id in sorted(set(refund_ids) - {row.id for row in rows}):
        checked.failed[refund_id] = NotFound(f"refunds {refund_id} does not exist")
    calls = calls_to_make(rows, gateway_for, checked, asking, include_review)
    answers = ask_gateways(calls, concurrency)
    found = sort_answers(steps.session, calls, answers, checked, clock, actor)
    record_checks(steps.session, found, {row.id for row in rows}, checked, clock(), actor)
    return checked


def read_refunds(session: Session, refund_ids: Sequence[int]) -> Sequence[Any]:
    return session.execute(
        select(
            Refund.id,
            Refund.status,
            Refund.requires_manual_review,
            Refund.gateway_refund_id,
            Refund.idempotency_key,
            Refund.amount,
            Refund.currency,
            Refund.reason,
            Payment.gateway,
            Payment.gateway_payment_id,
        )
        .join(Payment, Payment.id == Refund.payment_id)
        .where(Refund.id.in_(list(refund_ids)))
        .order_by(Refund.id)
    ).all()


def calls_to_make(
    rows: Sequence[Any],
    gateway_for: GatewayFor,
    checked: Checked,
    asking: tuple[str, ...] = ("PROCESSING",),
    include_review: bool = False,
) -> list[Any]:
    """The refunds to ask about, each with its gateway. The rest are reported as they are
    (no longer PROCESSING, or in manual review), failed (their gateway is not configured) or
    deferred (its breaker is open)."""
    calls: list[tuple[Any, Gateway]] = []
    gateways: dict[str, Gateway | Exception] = {}
    for row in rows:
        if row.status not in asking or (row.requires_manual_review and not include_review):
            checked.statuses[row.id] = row.status
            continue
        if row.gateway not in gateways:
            try:
                gateways[row.gateway] = gateway_for(row.gateway)
            except GatewayPermanent as exc:  # not configured: every refund on it says so
                gateways[row.gateway] = exc
        gateway = gateways[row.gateway]
        if isinstance(gateway, Exception):
            checked.failed[row.id] = gateway
        elif (wait := open_seconds(gateway)) > 0:
            checked.deferred[row.id] = wait
        else:
            calls.append((row, gateway))
    return calls


def sort_answers(
    session: Session,
    calls: Sequence[tuple[Any, Gateway]],
    answers: Sequence[GatewayRefund | Exception | None],
    checked: Checked,
    clock: Callable[[], datetime],
    actor: str,
) -> dict[tuple[str, str], list[int]]:
    """Each answer into `checked`. A final answer about a refund we know the gateway id of is
    returned, grouped by (status, raw status), for one batch transition each; one found by our
    reference is recorded at once, as a submission's outcome (the row learns its id)."""
    found: dict[tuple[str, str], list[int]] = defaultdict(list)
    for (row, gateway), answer in zip(calls, answers, strict=True):
        if isinstance(answer, CircuitOpen):  # opened while this round was under way
            checked.deferred[row.id] = max(open_seconds(gateway), 1.0)
        elif isinstance(answer, GatewayPermanent):
            checked.failed[row.id] = answer
        elif isinstance(answer, Exception):
            checked.retry[row.id] = answer
        elif answer is None or answer.status == row.status == "PROCESSING":
            checked.statuses[row.id] = row.status  # left to the next run, then escalation
        elif row.gateway_refund_id and row.status == "PROCESSING":
            found[(answer.status, answer.raw_status)].append(row.id)
        else:
            # The refund's reference names the attempt it was made for: an older one than the
            # row's current attempt is a superseded outcome.
            key = answer.idempotency_key or row.idempotency_key
            status = record_outcome(session, row.id, key, answer, clock(), actor)
            checked.statuses[row.id] = status
    return found


def record_checks(
    session: Session,
    found: dict[tuple[str, str], list[int]],
    known: set[int],
    checked: Checked,
    now: datetime,
    actor: str,
) -> None:
    """The final answers, one audited batch transition per outcome; each refund that got no
    answer keeps the error as its `last_error`."""
    for (status, raw_status), ids in found.items():
        transition_batch(
            session,
            "refunds",
            select(Refund.id).where(Refund.id.in_(ids)),
            "PROCESSING",
            status,
            actor=actor,
            reason=f"gateway says {raw_status}",
            now=now,
            values={
                "in_flight_until": None,
                "last_error": f"gateway says {raw_status}" if status == "FAILED" else None,
            },
        )
        checked.statuses.update(dict.fromkeys(ids, status))
    errors = {**checked.retry, **checked.failed}
    if errors.keys() & known:
        session.execute(
            update(Refund),
            [
                {"id": refund_id, "last_error": one_line(error)[:2000]}
                for refund_id, error in errors.items()
                if refund_id in known
            ],
        )


def ask_gateways(
    calls: Sequence[tuple[Any, Gateway]], concurrency: int
) -> list[GatewayRefund | Exception | None]:
    """Each refund's answer from its gateway, in order: the refund, None (the gateway has no
    refund with our reference), or the gateway error. Run on a pool kept per process, so the
    SDKs' HTTP connections (kept per thread by Stripe's) are reused from one round to the next."""

    def ask(call: tuple[Any, Gateway]) -> GatewayRefund | Exception | None:
        row, gateway = call
        try:
            if row.gateway_refund_id:
                return gateway.fetch_refund(row.gateway_payment_id, row.gateway_refund_id)
            return gateway.find_refund(
                RefundRequest(
                    refund_id=row.id,
                    idempotency_key=row.idempotency_key or "",
                    gateway_payment_id=row.gateway_payment_id,
                    amount=row.amount,
                    currency=row.currency,
                    reason=row.reason,
                )
            )
        except (GatewayTransient, GatewayPermanent, OutcomeUnknown) as exc:
            return exc
        except SoftTimeLimitExceeded:
            raise  # the task's own time is up, not this refund's answer
        except Exception as exc:  # one refund's odd answer never costs the others theirs
            return GatewayTransient(f"refunds {row.id}: unexpected {type(exc).__name__}: {exc}")

    if concurrency <= 1 or len(calls) <= 1:
        return [ask(call) for call in calls]
    return list(thread_pool(concurrency).map(ask, calls))


def finish_checks(
    session: Session,
    checked: Checked,
    *,
    task_id: str | None,
    now: datetime,
    max_countdown: float,
) -> None:
    """After a batch of re-checks: refunds whose gateway's breaker is open are sent again as
    one task once it may close; each refund that cannot be asked about at all gets its own dead
    letter as a `refunds.check`, replayable on its own. Both commit with the outcomes."""
    waits: dict[int, list[int]] = defaultdict(list)
    for refund_id, seconds in checked.deferred.items():
        waits[max(1, min(int(seconds + 0.999), int(max_countdown)))].append(refund_id)
    for countdown, ids in waits.items():
        enqueue_after_commit(
            session, "refunds.check_many", {"refund_ids": sorted(ids)}, countdown=countdown
        )
    for refund_id, error in checked.failed.items():
        letter = record_dead_letter(
            session,
            task_name="refunds.check",
            task_id=task_id,
            payload={"refund_id": refund_id},
            error=error,
            attempts=1,
            classification=classify(error),
            now=now,
        )
        log.error(
            "refund.check_failed",
            extra={"refund_id": refund_id, "dead_letter_id": letter, "error": one_line(error)},
        )
