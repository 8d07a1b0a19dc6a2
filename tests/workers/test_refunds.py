"""Refund submission, re-checks and the retry job: real Postgres, the official SDKs over HTTP
to the simulator, and the simulator's effect counters as the proof of "at most once"."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import Engine, select, update

from tests.workers import factories
from workers.db import Steps, new_session, session_scope
from workers.errors import NotFound
from workers.gateways.base import GatewayPermanent, GatewayTransient, OutcomeUnknown
from workers.models import Notification, Refund, StateTransition
from workers.refunds.checks import check_refunds, finish_checks
from workers.refunds.retries import RetryPolicy, retry_stuck_refunds
from workers.refunds.submission import RefundInFlight, submit_refund

GATEWAYS = ["razorpay", "stripe"]
LEASE = timedelta(seconds=30)
T0 = datetime(2026, 6, 1, 12, tzinfo=UTC)
POLICY = RetryPolicy(
    stuck_after=timedelta(hours=1),
    pending_after=timedelta(minutes=10),
    escalate_after=timedelta(days=1),
    max_attempts=3,
    batch_size=50,
    check_chunk=4,
)


class Clock:
    def __init__(self, at: datetime = T0) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def add_refund(
    sim: Any, gateway: str, amount: int = 1_000, paid: int = 50_000, created_at: datetime = T0
) -> int:
    return factories.add_refund(sim, gateway, amount=amount, paid=paid, created_at=created_at)


def refund(refund_id: int) -> Refund:
    with session_scope() as session:
        return session.get(Refund, refund_id)


def submit(
    refund_id: int, gateways: dict[str, Any], clock: Callable[[], datetime] | None = None
) -> str:
    """What the task does: one session, committed at the end by the base task."""
    with session_scope() as session:
        return submit_refund(
            Steps(session), refund_id, clock or Clock(), gateways.__getitem__, lease=LEASE
        )


def check(refund_id: int, gateways: dict[str, Any]) -> str:
    """What `refunds.check` does: one refund re-checked, its failure raised as the task's."""
    with session_scope() as session:
        return check_refunds(Steps(session), [refund_id], Clock(), gateways.__getitem__).outcome(
            refund_id
        )


def made_once(sim: Any) -> bool:
    return sim.effects()["duplicates"] == []


@pytest.mark.parametrize("name", GATEWAYS)
def test_a_refund_is_sent_once_and_completed(
    committed: Engine, sim: Any, gateways: dict[str, Any], name: str
) -> None:
    refund_id = add_refund(sim, name)
    assert submit(refund_id, gateways) == "COMPLETED"
    row = refund(refund_id)
    assert (row.status, row.attempts, row.in_flight_until) == ("COMPLETED", 1, None)
    assert row.gateway_refund_id and row.idempotency_key.startswith(f"bkr-{refund_id}-")
    assert sim.effects()["by_idempotency_key"] == {row.idempotency_key: 1}
    with session_scope() as session:
        audit = session.scalars(
            select(StateTransition).where(StateTransition.entity == "refunds")
        ).one()
    assert (audit.from_status, audit.to_status, audit.actor) == (
        "PENDING",
        "COMPLETED",
        "refunds.submit",
    )
    # Never sent again, however often it is asked.
    requests_before = sum(sim.stats()["requests"].values())
    assert submit(refund_id, gateways) == "already_completed"
    assert sum(sim.stats()["requests"].values()) == requests_before


@pytest.mark.parametrize("name", GATEWAYS)
def test_the_key_is_committed_before_the_gateway_is_called(
    committed: Engine, sim: Any, gateways: dict[str, Any], name: str
) -> None:
    refund_id = add_refund(sim, name)
    seen: dict[str, Any] = {}
    real = gateways[name].submit_refund

    def spy(request: Any) -> Any:
        seen["persisted"] = refund(refund_id).idempotency_key  # read by another session
        seen["sent"] = request.idempotency_key
        return real(request)

    gateways[name].submit_refund = spy
    submit(refund_id, gateways)
    assert seen["persisted"] == seen["sent"] is not None


@pytest.mark.parametrize("name", GATEWAYS)
def test_pending_at_the_gateway_is_processing_then_rechecked(
    committed: Engine, sim: Any, gateways: dict[str, Any], name: str
) -> None:
    sim.set_refund_outcome(name, "pending")
    refund_id = add_refund(sim, name)
    assert submit(refund_id, gateways) == "PROCESSING"
    assert check(refund_id, gateways) == "PROCESSING"
    sim.settle_refund(
        refund(refund_id).gateway_refund_id, "processed" if name == "razorpay" else "succeeded"
    )
    assert check(refund_id, gateways) == "COMPLETED"
    assert refund(refund_id).status == "COMPLETED"


@pytest.mark.parametrize("name", GATEWAYS)
@pytest.mark.parametrize(
    ("kind", "raised"),
    [
        ("503", GatewayTransient),
        ("429", GatewayTransient),
        ("lost", OutcomeUnknown),
        ("timeout", OutcomeUnknown),
    ],
)
def test_a_failed_call_keeps_the_key_and_the_retry_makes_it_once(
    committed: Engine, sim: Any, gateways: dict[str, Any], name: str, kind: str, raised: type
) -> None:
    refund_id = add_refund(sim, name)
    sim.add_fault(f"{name}.refund.create", kind, hang_seconds=1.5, remaining=1)
    with pytest.raises(raised):
        submit(refund_id, gateways)
    row = refund(refund_id)
    assert (row.status, row.in_flight_until) == ("PENDING", None)  # lease released
    assert row.last_error and row.key_sent_at == T0
    key = row.idempotency_key
    assert submit(refund_id, gateways) == "COMPLETED"
    assert refund(refund_id).idempotency_key == key
    assert sim.effects()["by_idempotency_key"] == {key: 1}
    assert refund(refund_id).attempts == 1  # one attempt, sent twice


def test_a_lost_response_after_the_key_expired_is_looked_up_not_resent(
    committed: Engine, sim: Any, gateways: dict[str, Any]
) -> None:
    """Stripe forgets keys after 24 h: resending the same key then would refund twice. The
    refund made by the lost request is found by our reference and adopted instead."""
    refund_id = add_refund(sim, "stripe")
    sim.add_fault("stripe.refund.create", "lost", hang_seconds=1.5, remaining=1)
    with pytest.raises(OutcomeUnknown):
        submit(refund_id, gateways, Clock(T0))
    sim.advance(25 * 3600)
    assert submit(refund_id, gateways, Clock(T0 + timedelta(hours=25))) == "COMPLETED"
    assert sim.effects()["refunds_created"] == 1 and made_once(sim)


def test_after_the_key_expired_and_nothing_was_made_it_is_sent(
    committed: Engine, sim: Any, gateways: dict[str, Any]
) -> None:
    refund_id = add_refund(sim, "stripe")
    sim.add_fault("stripe.refund.create", "timeout", hang_seconds=1.5, remaining=1)
    with pytest.raises(OutcomeUnknown):
        submit(refund_id, gateways, Clock(T0))
    sim.advance(25 * 3600)
    assert submit(refund_id, gateways, Clock(T0 + timedelta(hours=25))) == "COMPLETED"
    assert sim.effects()["refunds_created"] == 1


@pytest.mark.parametrize("name", GATEWAYS)
def test_a_refusal_fails_the_attempt(
    committed: Engine, sim: Any, gateways: dict[str, Any], name: str
) -> None:
    refund_id = add_refund(sim, name, amount=9_000, paid=5_000)
    assert submit(refund_id, gateways) == "FAILED"
    row = refund(refund_id)
    assert row.status == "FAILED" and "HTTP 400" in row.last_error
    assert row.in_flight_until is None


def test_an_unconfigured_gateway_changes_nothing(committed: Engine, sim: Any) -> None:
    refund_id = add_refund(sim, "stripe")

    def unconfigured(name: str) -> Any:
        raise GatewayPermanent(f"{name} is not configured: set STRIPE_API_KEY")

    with pytest.raises(GatewayPermanent, match="set STRIPE_API_KEY"), session_scope() as session:
        submit_refund(Steps(session), refund_id, Clock(), unconfigured, lease=LEASE)
    row = refund(refund_id)
    assert (row.status, row.idempotency_key, row.attempts, row.in_flight_until) == (
        "PENDING",
        None,
        0,
        None,
    )


def test_an_unknown_refund_is_not_found(committed: Engine, gateways: dict[str, Any]) -> None:
    with pytest.raises(NotFound, match="refunds 4040 does not exist"):
        submit(4040, gateways)


def test_two_workers_never_have_the_same_refund_in_flight(
    committed: Engine, sim: Any, gateways: dict[str, Any]
) -> None:
    """Eight threads on real connections submit the same refund at once while the gateway is
    slow: one holds the lease and sends; the rest are deferred or find it done."""
    refund_id = add_refund(sim, "razorpay")
    sim.add_fault("razorpay.refund.create", "latency", latency_ms=300)
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def worker() -> None:
        barrier.wait()
        try:
            outcomes.append(submit(refund_id, gateways, lambda: datetime.now(UTC)))
        except RefundInFlight:
            outcomes.append("in_flight")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sim.stats()["requests"].get("razorpay.refund.create") == 1
    assert outcomes.count("COMPLETED") == 1
    assert set(outcomes) <= {"COMPLETED", "in_flight", "already_completed"}


def queued(redis: redis_lib.Redis, queue: str = "critical") -> list[tuple[str, dict[str, Any]]]:
    import base64

    messages = []
    for raw in redis.lrange(queue, 0, -1):
        message = json.loads(raw)
        _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        messages.append((message["headers"]["task"], kwargs))
    return messages


def set_row(refund_id: int, **values: Any) -> None:
    with session_scope() as session:
        session.execute(update(Refund).where(Refund.id == refund_id).values(**values))


def test_retry_job_takes_each_kind_of_due_refund(
    committed: Engine, sim: Any, gateways: dict[str, Any], redis: redis_lib.Redis
) -> None:
    now = T0 + timedelta(hours=3)
    stuck = add_refund(sim, "razorpay")
    set_row(stuck, status="PROCESSING", gateway_refund_id="rfnd_x", updated_at=T0)
    fresh_processing = add_refund(sim, "razorpay")
    set_row(fresh_processing, status="PROCESSING", updated_at=now - timedelta(minutes=5))
    unfinished = add_refund(sim, "stripe")
    set_row(unfinished, idempotency_key="bkr-old-key-123", key_sent_at=T0, updated_at=T0)
    failed = add_refund(sim, "stripe")
    set_row(
        failed,
        status="FAILED",
        attempts=1,
        idempotency_key="bkr-failed-key-1",
        gateway_refund_id="re_failed",
        updated_at=T0,
    )
    out_of_attempts = add_refund(sim, "stripe")
    set_row(out_of_attempts, status="FAILED", attempts=3, updated_at=T0)
    done = add_refund(sim, "stripe")
    set_row(done, status="COMPLETED", updated_at=T0)

    with session_scope() as session:
        counts = retry_stuck_refunds(Steps(session), Clock(now), POLICY)
    assert counts.as_dict() == {"checked": 1, "resubmitted": 1, "reattempted": 1, "escalated": 1}
    assert sorted((name, next(iter(kwargs.values()))) for name, kwargs in queued(redis)) == sorted(
        [
            ("refunds.check_many", [stuck]),
            ("refunds.submit", unfinished),
            ("refunds.submit", failed),
        ]
    )
    again = refund(failed)
    assert again.status == "PENDING" and again.idempotency_key not in (None, "bkr-failed-key-1")
    assert (again.key_sent_at, again.gateway_refund_id) == (None, None)
    assert refund(unfinished).idempotency_key == "bkr-old-key-123"  # resent with its key
    assert refund(out_of_attempts).requires_manual_review is True
    # A second run soon after takes nothing again.
    with session_scope() as session:
        counts = retry_stuck_refunds(Steps(session), Clock(now + timedelta(minutes=1)), POLICY)
    assert counts.as_dict() == {"checked": 0, "resubmitted": 0, "reattempted": 0, "escalated": 0}


def test_two_retry_jobs_at_the_same_moment_take_each_refund_once(
    committed: Engine, sim: Any, redis: redis_lib.Redis
) -> None:
    now = T0 + timedelta(hours=3)
    ids = [add_refund(sim, "razorpay") for _ in range(120)]
    with session_scope() as session:
        session.execute(
            update(Refund).where(Refund.id.in_(ids)).values(status="PROCESSING", updated_at=T0)
        )
    barrier = threading.Barrier(2)
    results: list[dict[str, int]] = []

    def run() -> None:
        session = new_session()
        try:
            barrier.wait()
            results.append(
                retry_stuck_refunds(
                    Steps(session), Clock(now), RetryPolicy(**{**POLICY.__dict__, "batch_size": 10})
                ).as_dict()
            )
            session.commit()
        finally:
            session.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    chunks = [
        kwargs["refund_ids"] for name, kwargs in queued(redis) if name == "refunds.check_many"
    ]
    checked = [refund_id for chunk in chunks for refund_id in chunk]
    assert sorted(checked) == sorted(ids)  # every refund once, none twice
    assert max(map(len, chunks)) <= POLICY.check_chunk
    assert sum(result["checked"] for result in results) == 120


def test_unresolved_refunds_escalate_once_with_an_alert(
    committed: Engine, sim: Any, redis: redis_lib.Redis
) -> None:
    old = add_refund(sim, "stripe", created_at=T0 - timedelta(days=2))
    set_row(old, status="PROCESSING", updated_at=T0 - timedelta(days=2))
    for minutes in (0, 40):
        with session_scope() as session:
            retry_stuck_refunds(Steps(session), Clock(T0 + timedelta(minutes=minutes)), POLICY)
    assert refund(old).requires_manual_review is True
    with session_scope() as session:
        alerts = session.scalars(
            select(Notification).where(Notification.template == "alert.refund_manual_review")
        ).all()
    assert len(alerts) == 1 and alerts[0].data["refund_ids"] == str(old)
    assert alerts[0].data["message"].startswith("1 refund needs manual review")
    assert queued(redis) == []  # not retried automatically any more


def test_a_run_that_escalates_many_refunds_raises_one_alert_naming_them(
    committed: Engine, sim: Any, redis: redis_lib.Redis
) -> None:
    """After a day-long gateway outage: every stuck refund escalated by one run, one page."""
    ids = [
        add_refund(sim, "stripe", created_at=T0 - timedelta(days=2, minutes=i)) for i in range(30)
    ]
    for refund_id in ids[:20]:
        set_row(refund_id, status="PROCESSING")
    set_row(ids[20], status="FAILED", attempts=POLICY.max_attempts)
    with session_scope() as session:
        counts = retry_stuck_refunds(Steps(session), Clock(T0), POLICY)
    assert counts.escalated == 30
    with session_scope() as session:
        [alert] = session.scalars(
            select(Notification).where(Notification.template == "alert.refund_manual_review")
        ).all()
    message = alert.data["message"]
    assert message.startswith("30 refunds need manual review")
    assert "1 FAILED, 9 PENDING, 20 PROCESSING" in message
    assert f"oldest: refund {ids[-1]}" in message and message.endswith(" ...")
    assert alert.data["refund_ids"] == ",".join(map(str, ids)) and alert.data["count"] == "30"
    with session_scope() as session:
        again = retry_stuck_refunds(Steps(session), Clock(T0 + timedelta(minutes=30)), POLICY)
    assert again.escalated == 0  # flagged once: the next run neither escalates nor pages


def test_an_open_breaker_defers_without_claiming_or_sending(
    committed: Engine, sim: Any, gateways: dict[str, Any], redis: redis_lib.Redis
) -> None:
    from workers.errors import Defer
    from workers.gateways.breaker import GuardedGateway, make_breaker

    breaker = make_breaker("stripe", fail_max=1, reset_seconds=60, redis=redis)
    guarded = {"stripe": GuardedGateway(gateways["stripe"], lambda: breaker)}
    breaker.open()
    refund_id = add_refund(sim, "stripe")
    with pytest.raises(Defer) as deferred:
        submit(refund_id, guarded)
    assert 50 < deferred.value.seconds <= 60
    row = refund(refund_id)
    assert (row.status, row.idempotency_key, row.attempts) == ("PENDING", None, 0)
    assert sim.stats()["requests"].get("stripe.refund.create", 0) == 0
    breaker.close()
    assert submit(refund_id, guarded) == "COMPLETED"


def test_a_breaker_that_opens_after_the_claim_defers_without_spending_a_retry(
    committed: Engine, sim: Any, gateways: dict[str, Any], redis: redis_lib.Redis
) -> None:
    """Another process trips the breaker between this one's look and its call: the call is
    refused before anything is sent, so the task defers like any other, lease released."""
    from workers.errors import Defer
    from workers.gateways.breaker import GuardedGateway, make_breaker

    breaker = make_breaker("stripe", fail_max=1, reset_seconds=60, redis=redis)

    class TrippedAfterTheLook(GuardedGateway):
        def open_for(self) -> float:
            seconds = super().open_for()
            breaker.open()
            return seconds

    refund_id = add_refund(sim, "stripe")
    with pytest.raises(Defer) as deferred:
        submit(refund_id, {"stripe": TrippedAfterTheLook(gateways["stripe"], lambda: breaker)})
    assert 50 < deferred.value.seconds <= 60
    row = refund(refund_id)
    assert (row.status, row.in_flight_until) == ("PENDING", None)
    assert "circuit breaker is open" in row.last_error
    assert sim.stats()["requests"].get("stripe.refund.create", 0) == 0


# -- re-checks in chunks ----------------------------------------------------------------------

SETTLED = {"razorpay": "processed", "stripe": "succeeded"}


def processing(sim: Any, gateways: dict[str, Any], name: str) -> int:
    """A refund sent to its gateway and left pending there: PROCESSING in our table."""
    sim.set_refund_outcome(name, "pending")
    refund_id = add_refund(sim, name)
    assert submit(refund_id, gateways) == "PROCESSING"
    return refund_id


def settle(sim: Any, refund_id: int, status: str) -> None:
    sim.settle_refund(refund(refund_id).gateway_refund_id, status)


def check_chunk(ids: list[int], gateways: dict[str, Any], concurrency: int = 4) -> Any:
    with session_scope() as session:
        return check_refunds(
            Steps(session),
            ids,
            Clock(T0 + timedelta(hours=2)),
            gateways.__getitem__,
            concurrency=concurrency,
            actor="test.chunk",
        )


def requests_seen(sim: Any) -> dict[str, int]:
    return dict(sim.stats()["requests"])


def test_a_chunk_moves_each_refund_on_its_gateways_answer(
    committed: Engine, sim: Any, gateways: dict[str, Any]
) -> None:
    rzp_done = processing(sim, gateways, "razorpay")
    stp_done = processing(sim, gateways, "stripe")
    stp_failed = processing(sim, gateways, "stripe")
    rzp_pending = processing(sim, gateways, "razorpay")
    lost_id = processing(sim, gateways, "stripe")  # made, but its gateway id never recorded
    in_review = processing(sim, gateways, "razorpay")
    already = add_refund(sim, "stripe")
    settle(sim, rzp_done, "processed")
    settle(sim, stp_done, "succeeded")
    settle(sim, stp_failed, "failed")
    settle(sim, lost_id, "succeeded")
    lost_gateway_id = refund(lost_id).gateway_refund_id
    set_row(lost_id, gateway_refund_id=None)
    set_row(in_review, requires_manual_review=True)
    set_row(already, status="COMPLETED")
    before = requests_seen(sim)

    ids = [rzp_done, stp_done, stp_failed, rzp_pending, lost_id, in_review, already, 999_999]
    checked = check_chunk(ids, gateways)

    assert checked.statuses == {
        rzp_done: "COMPLETED",
        stp_done: "COMPLETED",
        stp_failed: "FAILED",
        rzp_pending: "PROCESSING",
        lost_id: "COMPLETED",
        in_review: "PROCESSING",  # reported as it is, not asked about
        already: "COMPLETED",
    }
    assert list(checked.failed) == [999_999] and isinstance(checked.failed[999_999], NotFound)
    assert checked.retry == {} and checked.deferred == {}
    for refund_id, status in checked.statuses.items():
        assert refund(refund_id).status == status
    assert refund(lost_id).gateway_refund_id == lost_gateway_id  # learned from the lookup
    assert refund(stp_failed).last_error == "gateway says failed"
    # One question per refund that needed one: nothing for the finished or reviewed ones.
    after = requests_seen(sim)
    asked = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key)}
    assert asked == {
        "razorpay.refund.fetch": 2,
        "stripe.refund.fetch": 2,
        "stripe.refund.list": 1,
    }
    with session_scope() as session:
        audit = session.execute(
            select(
                StateTransition.entity_id, StateTransition.to_status, StateTransition.actor
            ).where(StateTransition.actor == "test.chunk")
        ).all()
    assert sorted(audit) == sorted(
        [
            (rzp_done, "COMPLETED", "test.chunk"),
            (stp_done, "COMPLETED", "test.chunk"),
            (stp_failed, "FAILED", "test.chunk"),
            (lost_id, "COMPLETED", "test.chunk"),
        ]
    )
    # Asked again, nothing moves twice and the gateways are asked only about the pending one.
    again = check_chunk(ids, gateways)
    assert again.statuses == checked.statuses
    assert sum(requests_seen(sim).values()) == sum(after.values()) + 1


def test_a_chunk_keeps_its_answers_and_reports_what_it_could_not_learn(
    committed: Engine, sim: Any, gateways: dict[str, Any], redis: redis_lib.Redis
) -> None:
    from workers.models import DeadLetter

    answered = processing(sim, gateways, "razorpay")
    unknown_at_gateway = processing(sim, gateways, "razorpay")
    busy = processing(sim, gateways, "stripe")
    settle(sim, answered, "processed")
    set_row(unknown_at_gateway, gateway_refund_id="rfnd_NoSuchRefund01")
    sim.add_fault("stripe.refund.fetch", "503", remaining=1)

    with session_scope() as session:
        checked = check_refunds(
            Steps(session),
            [answered, unknown_at_gateway, busy],
            Clock(),
            gateways.__getitem__,
            concurrency=3,
        )
        finish_checks(session, checked, task_id="t-1", now=T0, max_countdown=900)

    assert checked.statuses == {answered: "COMPLETED"}
    assert list(checked.retry) == [busy] and isinstance(checked.retry[busy], GatewayTransient)
    assert list(checked.failed) == [unknown_at_gateway]
    assert isinstance(checked.failed[unknown_at_gateway], GatewayPermanent)
    assert refund(answered).status == "COMPLETED"
    assert refund(busy).status == "PROCESSING" and "503" in (refund(busy).last_error or "")
    assert "does not exist" in (refund(unknown_at_gateway).last_error or "")
    with session_scope() as session:
        letters = session.scalars(select(DeadLetter)).all()
        assert [(d.task_name, d.payload, d.classification) for d in letters] == [
            ("refunds.check", {"refund_id": unknown_at_gateway}, "PERMANENT")
        ]
    assert queued(redis) == []  # nothing deferred
    with pytest.raises(GatewayTransient):
        checked.outcome(busy)  # the single-refund task would retry it


def test_an_open_breaker_holds_back_its_gateways_refunds_and_sends_them_later(
    committed: Engine, sim: Any, gateways: dict[str, Any], redis: redis_lib.Redis
) -> None:
    from workers.errors import Defer
    from workers.gateways.breaker import Breakers, GuardedGateway, make_breaker

    rzp = processing(sim, gateways, "razorpay")
    stp = [processing(sim, gateways, "stripe") for _ in range(2)]
    for refund_id in [rzp, *stp]:
        settle(sim, refund_id, SETTLED["razorpay" if refund_id == rzp else "stripe"])
    breaker = make_breaker("stripe", fail_max=1, reset_seconds=60, redis=redis)
    guarded = {
        "razorpay": gateways["razorpay"],
        "stripe": GuardedGateway(
            gateways["stripe"], Breakers("stripe", fail_max=1, reset_seconds=60, redis=redis)
        ),
    }
    breaker.open()
    before = requests_seen(sim)
    with session_scope() as session:
        checked = check_refunds(
            Steps(session), [rzp, *stp], Clock(), guarded.__getitem__, concurrency=4
        )
        finish_checks(session, checked, task_id=None, now=T0, max_countdown=900)
    assert checked.statuses == {rzp: "COMPLETED"}
    assert sorted(checked.deferred) == stp and all(50 < s <= 60 for s in checked.deferred.values())
    assert requests_seen(sim).get("stripe.refund.fetch", 0) == before.get("stripe.refund.fetch", 0)
    assert [refund(refund_id).status for refund_id in stp] == ["PROCESSING", "PROCESSING"]
    [(name, kwargs)] = queued(redis)
    assert (name, kwargs) == ("refunds.check_many", {"refund_ids": stp})
    [raw] = redis.lrange("critical", 0, -1)
    assert json.loads(raw)["headers"]["eta"] is not None  # sent with the breaker's wait
    with pytest.raises(Defer):
        checked.outcome(stp[0])


# -- outcomes that arrive late ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "raw", "review"),
    [
        ("COMPLETED", "processed", True),
        ("PROCESSING", "pending", True),
        ("FAILED", "failed", False),
    ],
)
def test_an_answer_for_a_superseded_attempt_moves_nothing(
    committed: Engine, sim: Any, status: str, raw: str, review: bool
) -> None:
    """Attempt 1 (key K1) had no answer; it failed at the gateway, and attempt 2 (key K2) has
    started. Attempt 1's request then comes back: its answer must not move the refund, and if
    it says a refund exists, a person must look before attempt 2 refunds the customer again."""
    from workers.gateways.base import GatewayRefund
    from workers.refunds.submission import record_outcome

    refund_id = add_refund(sim, "razorpay")
    with session_scope() as session:
        session.execute(
            update(Refund).where(Refund.id == refund_id).values(idempotency_key="bkr-attempt-2")
        )
    late = GatewayRefund("rfnd_late", status, raw, 1_000, "INR", "bkr-attempt-1")
    with session_scope() as session:
        assert record_outcome(session, refund_id, "bkr-attempt-1", late, T0, "test") == "PENDING"
    row = refund(refund_id)
    assert (row.status, row.gateway_refund_id, row.requires_manual_review) == (
        "PENDING",
        None,
        review,
    )
    with session_scope() as session:
        moved = session.scalars(
            select(StateTransition).where(StateTransition.entity_id == refund_id)
        ).all()
        alerts = session.scalars(
            select(Notification.dedupe_key).where(Notification.recipient == "ops")
        ).all()
    assert moved == []
    assert alerts == ([f"alert:refund-superseded:{refund_id}:rfnd_late"] if review else [])


# -- answers the adapters cannot read -------------------------------------------------------


@pytest.mark.parametrize("name", ["razorpay", "stripe"])
def test_an_unreadable_answer_to_a_refund_is_an_unknown_outcome_resolved_by_lookup(
    committed: Engine, sim: Any, gateways: dict[str, Any], name: str
) -> None:
    """The gateway made the refund and answered 200 with a body we cannot read. Not a failure
    (a new key would refund twice) and not a crash that leaves the lease set: the refund stays
    PENDING with its key, and the next attempt finds the refund by our reference."""
    refund_id = add_refund(sim, name)
    create = f"{name}.refund.create"
    sim.reshape(create, lambda body: {k: v for k, v in body.items() if k != "amount"})
    with pytest.raises(OutcomeUnknown, match="'amount'"):
        submit(refund_id, gateways)
    row = refund(refund_id)
    assert (row.status, row.in_flight_until) == ("PENDING", None)
    assert row.idempotency_key and row.key_sent_at is not None
    sim.reshape(None, None)
    assert submit(refund_id, gateways, Clock(T0 + LEASE)) == "COMPLETED"
    assert sim.effects()["refunds_created"] == 1 and made_once(sim)
    assert sim.stats()["requests"][create] == 1  # found, not sent again


def test_a_listing_without_status_finds_the_refund_instead_of_failing_the_attempt(
    committed: Engine, sim: Any, gateways: dict[str, Any]
) -> None:
    """Razorpay's published refund listings carry no `status`: the retry's lookup used to
    raise KeyError('status'), which left the lease set and dead-lettered the task."""
    refund_id = add_refund(sim, "razorpay")
    sim.add_fault("razorpay.refund.create", "lost", hang_seconds=1, remaining=1)
    with pytest.raises(OutcomeUnknown):
        submit(refund_id, gateways)

    def no_status(body: Any) -> Any:
        items = [{k: v for k, v in item.items() if k != "status"} for item in body["items"]]
        return {**body, "items": items}

    sim.reshape("razorpay.payment.refunds", no_status)
    assert submit(refund_id, gateways, Clock(T0 + LEASE)) == "PROCESSING"
    assert refund(refund_id).gateway_refund_id is not None
    assert sim.effects()["refunds_created"] == 1 and made_once(sim)


def test_one_unreadable_answer_in_a_chunk_keeps_the_others(
    committed: Engine, sim: Any, gateways: dict[str, Any]
) -> None:
    ids = []
    for _ in range(3):
        sim.set_refund_outcome("razorpay", "pending")
        refund_id = add_refund(sim, "razorpay")
        assert submit(refund_id, gateways) == "PROCESSING"
        sim.settle_refund(refund(refund_id).gateway_refund_id, "processed")
        ids.append(refund_id)
    odd = refund(ids[1]).gateway_refund_id

    def drop_status_of_one(body: Any) -> Any:
        return {k: v for k, v in body.items() if k != "status"} if body["id"] == odd else body

    sim.reshape("razorpay.refund.fetch", drop_status_of_one)
    with session_scope() as session:
        checked = check_refunds(Steps(session), ids, Clock(), gateways.__getitem__, concurrency=3)
    assert {i: checked.statuses.get(i) for i in (ids[0], ids[2])} == {
        ids[0]: "COMPLETED",
        ids[2]: "COMPLETED",
    }
    assert list(checked.retry) == [ids[1]] and "'status'" in str(checked.retry[ids[1]])
    assert {refund(i).status for i in (ids[0], ids[2])} == {"COMPLETED"}


def test_a_lookup_the_gateway_refuses_before_a_resend_leaves_the_refund_unknown_not_failed(
    committed: Engine, sim: Any, gateways: dict[str, Any]
) -> None:
    """The first request's answer was lost; before sending the key again the refund it may
    have made is looked up, and the lookup is refused (say, keys being rotated). FAILED would
    let a new attempt with a new key refund the customer twice."""
    refund_id = add_refund(sim, "stripe")
    sim.add_fault("stripe.refund.create", "lost", hang_seconds=1, remaining=1)
    with pytest.raises(OutcomeUnknown):
        submit(refund_id, gateways)
    sim.add_fault("stripe.refund.list", "401", remaining=1)
    with pytest.raises(OutcomeUnknown, match="cannot be looked up"):
        submit(refund_id, gateways, Clock(T0 + LEASE))
    assert refund(refund_id).status == "PENDING"
    assert submit(refund_id, gateways, Clock(T0 + 2 * LEASE)) == "COMPLETED"
    assert sim.effects()["refunds_created"] == 1 and made_once(sim)
