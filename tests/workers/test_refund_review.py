"""What an operator may do about a refund that needs a person (`workers/refunds/review.py`,
behind `backstop refunds` and the console): real Postgres, the official SDKs over HTTP to the
simulator, the simulator's effect counters as the proof that nothing is refunded twice."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import Engine, select

from tests.workers.test_refunds import (
    POLICY,
    T0,
    Clock,
    add_refund,
    made_once,
    queued,
    refund,
    set_row,
    submit,
)
from workers.db import Steps, session_scope
from workers.models import StateTransition
from workers.refunds import review
from workers.refunds.retries import retry_stuck_refunds
from workers.refunds.submission import SUPERSEDED

STUCK = timedelta(hours=1)


def listed(now: Any = T0) -> list[int]:
    with session_scope() as session:
        return [
            row.id for row in review.page(session, review.needing_a_person(now, STUCK), limit=100)
        ]


def audit(refund_id: int) -> list[tuple[str, str, str, str]]:
    with session_scope() as session:
        return [
            (row.from_status, row.to_status, row.actor, row.reason or "")
            for row in session.scalars(
                select(StateTransition)
                .where(StateTransition.entity == "refunds", StateTransition.entity_id == refund_id)
                .order_by(StateTransition.id)
            )
        ]


def test_the_list_holds_refunds_in_review_and_stuck_ones_oldest_first(
    committed: Engine, sim: Any
) -> None:
    review_one = add_refund(sim, "stripe")
    set_row(review_one, status="FAILED", requires_manual_review=True)
    stuck = add_refund(sim, "razorpay")
    set_row(stuck, status="PROCESSING", updated_at=T0 - timedelta(hours=2))
    fresh = add_refund(sim, "razorpay")
    set_row(fresh, status="PROCESSING", updated_at=T0)
    done = add_refund(sim, "stripe")
    set_row(done, status="COMPLETED", requires_manual_review=True)
    assert listed() == [review_one, stuck]
    with session_scope() as session:
        assert review.count(session, review.needing_a_person(T0, STUCK)) == 2


@pytest.mark.parametrize("name", ["razorpay", "stripe"])
def test_a_recheck_asks_the_gateway_about_a_refund_in_review_and_records_its_answer(
    committed: Engine, sim: Any, gateways: dict[str, Any], name: str
) -> None:
    sim.set_refund_outcome(name, "pending")
    refund_id = add_refund(sim, name)
    assert submit(refund_id, gateways) == "PROCESSING"
    set_row(refund_id, requires_manual_review=True)
    sim.settle_refund(
        refund(refund_id).gateway_refund_id, "processed" if name == "razorpay" else "succeeded"
    )
    with session_scope() as session:
        said = review.recheck(
            Steps(session), refund_id, Clock(), gateways.__getitem__, actor="alice"
        )
    assert said == f"refund {refund_id}: PROCESSING -> COMPLETED (the gateway's answer)"
    assert refund(refund_id).status == "COMPLETED"
    assert audit(refund_id)[-1][:3] == ("PROCESSING", "COMPLETED", "alice")
    assert listed() == [] and made_once(sim)


def test_a_recheck_of_a_pending_refund_finds_what_a_lost_response_made(
    committed: Engine, sim: Any, gateways: dict[str, Any]
) -> None:
    refund_id = add_refund(sim, "stripe")
    sim.add_fault("stripe.refund.create", "lost", hang_seconds=1.5, remaining=1)
    with pytest.raises(Exception):  # noqa: B017  (an unknown outcome: OutcomeUnknown)
        submit(refund_id, gateways)
    assert refund(refund_id).status == "PENDING"
    with session_scope() as session:
        said = review.recheck(Steps(session), refund_id, Clock(), gateways.__getitem__, actor="bob")
    assert "PENDING -> COMPLETED" in said
    assert refund(refund_id).gateway_refund_id is not None
    assert sim.effects()["refunds_created"] == 1 and made_once(sim)


def test_a_new_attempt_gets_a_new_key_only_when_failed_and_never_while_at_the_gateway(
    committed: Engine, sim: Any, gateways: dict[str, Any], redis: redis_lib.Redis
) -> None:
    failed = add_refund(sim, "stripe", amount=9_000, paid=5_000)
    assert submit(failed, gateways) == "FAILED"
    old_key = refund(failed).idempotency_key
    set_row(failed, requires_manual_review=True)
    at_gateway = add_refund(sim, "stripe")
    set_row(at_gateway, status="PROCESSING", requires_manual_review=True)
    with session_scope() as session, pytest.raises(review.RefundActionError) as refused:
        review.new_attempt(session, at_gateway, actor="alice", reason="again", now=T0)
    assert "re-check it instead" in str(refused.value)
    with session_scope() as session, pytest.raises(review.RefundActionError):
        review.new_attempt(session, failed, actor="alice", reason=" ", now=T0)
    with session_scope() as session:
        said = review.new_attempt(session, failed, actor="alice", reason="card fixed", now=T0)
    assert "FAILED -> PENDING" in said
    row = refund(failed)
    assert (row.status, row.requires_manual_review) == ("PENDING", False)
    assert row.idempotency_key not in (None, old_key)
    assert audit(failed)[-1][:3] == ("FAILED", "PENDING", "alice")
    assert "card fixed" in audit(failed)[-1][3]
    assert queued(redis) == [("refunds.submit", {"refund_id": failed})]


def test_a_resolved_refund_leaves_the_list_and_no_job_takes_it_again(
    committed: Engine, sim: Any, redis: redis_lib.Redis
) -> None:
    refund_id = add_refund(sim, "stripe", created_at=T0 - timedelta(days=2))
    set_row(refund_id, status="FAILED", attempts=1, requires_manual_review=True)
    with session_scope() as session, pytest.raises(review.RefundActionError):
        review.resolve(session, refund_id, actor="alice", reason="", now=T0)
    with session_scope() as session:
        review.resolve(
            session, refund_id, actor="alice", reason="refunded by bank transfer", now=T0
        )
    assert listed() == []
    row = refund(refund_id)
    assert (row.resolved_at, row.resolution) == (T0, "refunded by bank transfer")
    assert audit(refund_id)[-1] == (
        "FAILED",
        "FAILED",
        "alice",
        "manual review resolved: refunded by bank transfer",
    )
    for minutes in (30, 60):  # the retry job and the escalation leave it alone
        with session_scope() as session:
            counts = retry_stuck_refunds(
                Steps(session), Clock(T0 + timedelta(minutes=minutes)), POLICY
            )
        assert counts.as_dict() == {
            "checked": 0,
            "resubmitted": 0,
            "reattempted": 0,
            "escalated": 0,
        }
    assert queued(redis) == []
    with session_scope() as session, pytest.raises(review.RefundActionError) as again:
        review.resolve(session, refund_id, actor="bob", reason="twice", now=T0)
    assert "nothing to resolve" in str(again.value)


def test_sending_a_pending_refund_again_keeps_its_key_and_makes_it_once(
    committed: Engine, sim: Any, gateways: dict[str, Any], redis: redis_lib.Redis
) -> None:
    """A refund whose response was lost, then escalated: sent again from review, the same key
    is looked up at the gateway first, and the refund the lost request made is adopted."""
    refund_id = add_refund(sim, "stripe")
    sim.add_fault("stripe.refund.create", "lost", hang_seconds=1.5, remaining=1)
    with pytest.raises(Exception):  # noqa: B017  (an unknown outcome: OutcomeUnknown)
        submit(refund_id, gateways)
    key = refund(refund_id).idempotency_key
    set_row(refund_id, requires_manual_review=True)
    with session_scope() as session:
        said = review.new_attempt(session, refund_id, actor="alice", reason="keys fixed", now=T0)
    assert "sent again with its key" in said
    assert queued(redis) == [("refunds.submit", {"refund_id": refund_id})]
    assert refund(refund_id).requires_manual_review is False
    assert audit(refund_id)[-1][:3] == ("PENDING", "PENDING", "alice")
    assert submit(refund_id, gateways) == "COMPLETED"  # what the sent task does
    assert refund(refund_id).idempotency_key == key
    assert sim.effects()["refunds_created"] == 1 and made_once(sim)


def test_a_refund_sent_again_from_review_is_not_escalated_straight_back(
    committed: Engine, sim: Any, redis: redis_lib.Redis
) -> None:
    """Escalated after a day, sent again by an operator: the escalation's day starts again."""
    refund_id = add_refund(sim, "stripe", created_at=T0 - timedelta(days=3))
    set_row(refund_id, status="FAILED", attempts=1, requires_manual_review=True)
    with session_scope() as session:
        review.new_attempt(session, refund_id, actor="alice", reason="card fixed", now=T0)
    with session_scope() as session:
        counts = retry_stuck_refunds(Steps(session), Clock(T0 + timedelta(minutes=30)), POLICY)
    assert counts.escalated == 0 and refund(refund_id).requires_manual_review is False
    with session_scope() as session:
        later = retry_stuck_refunds(
            Steps(session), Clock(T0 + timedelta(days=1, minutes=1)), POLICY
        )
    assert later.escalated == 1  # still unresolved a day after the operator's attempt


def test_no_new_key_for_a_refund_whose_earlier_attempt_exists_at_the_gateway(
    committed: Engine, sim: Any
) -> None:
    refund_id = add_refund(sim, "stripe")
    set_row(
        refund_id,
        status="FAILED",
        requires_manual_review=True,
        last_error=f"{SUPERSEDED}: gateway refund re_1 (succeeded) was made for key k-1",
    )
    with session_scope() as session, pytest.raises(review.RefundActionError) as refused:
        review.new_attempt(session, refund_id, actor="alice", reason="again", now=T0)
    assert "a new attempt could refund twice" in str(refused.value)
    assert refund(refund_id).status == "FAILED"
