"""The transition helper: compare-and-set, audited, idempotent, strict."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from tests.conftest import utc
from tests.workers.factories import add_hold, add_holds
from workers.db import InvalidTransition, claim, transition, transition_batch, transition_rows
from workers.errors import NotFound
from workers.models import BookingHold, Refund, StateTransition

NOW = utc(2026, 1, 1, 12)


def audit(session: Session, hold_id: int) -> list[tuple[str, str, str]]:
    return [
        (row.from_status, row.to_status, row.actor)
        for row in session.scalars(
            select(StateTransition)
            .where(StateTransition.entity == "booking_holds", StateTransition.entity_id == hold_id)
            .order_by(StateTransition.id)
        )
    ]


def test_allowed_transition_changes_the_row_and_writes_one_audit_row(any_db: Session) -> None:
    hold = add_hold(any_db, NOW)
    result = transition(
        any_db, "booking_holds", hold, "CONFIRMED", actor="test", reason="paid", now=NOW
    )
    assert (result.changed, result.from_status, result.to_status) == (True, "ACTIVE", "CONFIRMED")
    assert any_db.get(BookingHold, hold).status == "CONFIRMED"
    assert audit(any_db, hold) == [("ACTIVE", "CONFIRMED", "test")]
    row = any_db.scalars(select(StateTransition)).one()
    assert row.reason == "paid" and row.at == NOW


def test_repeating_a_transition_is_a_no_op_without_a_second_audit_row(any_db: Session) -> None:
    hold = add_hold(any_db, NOW)
    transition(any_db, "booking_holds", hold, "EXPIRED", actor="a", reason=None, now=NOW)
    again = transition(any_db, "booking_holds", hold, "EXPIRED", actor="b", reason=None, now=NOW)
    assert again.changed is False and again.from_status == "EXPIRED"
    assert audit(any_db, hold) == [("ACTIVE", "EXPIRED", "a")]


def test_disallowed_transition_is_rejected_with_a_clear_error(any_db: Session) -> None:
    hold = add_hold(any_db, NOW, status="CONFIRMED")
    with pytest.raises(InvalidTransition) as error:
        transition(any_db, "booking_holds", hold, "EXPIRED", actor="t", reason=None, now=NOW)
    assert str(error.value) == f"booking_holds {hold}: CONFIRMED -> EXPIRED is not allowed"
    assert audit(any_db, hold) == []


def test_unknown_row_and_unknown_target_status(any_db: Session) -> None:
    with pytest.raises(NotFound, match="booking_holds 424242 does not exist"):
        transition(any_db, "booking_holds", 424242, "EXPIRED", actor="t", reason=None, now=NOW)
    hold = add_hold(any_db, NOW)
    with pytest.raises(Exception, match="no transition leads to 'ACTIVE'"):
        transition(any_db, "booking_holds", hold, "ACTIVE", actor="t", reason=None, now=NOW)


def test_guard_holds_a_transition_back_without_changing_anything(any_db: Session) -> None:
    hold = add_hold(any_db, NOW + timedelta(minutes=5))
    result = transition(
        any_db,
        "booking_holds",
        hold,
        "EXPIRED",
        actor="t",
        reason=None,
        now=NOW,
        guard=BookingHold.expires_at <= NOW,
    )
    assert result.changed is False and result.from_status == "ACTIVE"
    assert any_db.get(BookingHold, hold).status == "ACTIVE"
    assert audit(any_db, hold) == []


def test_extra_values_are_set_in_the_same_update(any_db: Session) -> None:
    hold = add_hold(any_db, NOW)
    transition(
        any_db,
        "booking_holds",
        hold,
        "EXPIRED",
        actor="t",
        reason=None,
        now=NOW,
        values={"released_at": NOW},
    )
    row = any_db.get(BookingHold, hold)
    assert row.released_at == NOW and row.updated_at == NOW


def test_batch_transition_changes_only_rows_in_the_from_status(any_db: Session) -> None:
    active = add_holds(any_db, [NOW - timedelta(seconds=s) for s in range(5)])
    confirmed = add_hold(any_db, NOW - timedelta(seconds=9), status="CONFIRMED")
    ids = transition_batch(
        any_db,
        "booking_holds",
        select(BookingHold.id).where(BookingHold.id.in_([*active, confirmed])),
        "ACTIVE",
        "EXPIRED",
        actor="sweep",
        reason="r",
        now=NOW,
    )
    assert sorted(ids) == sorted(active)
    assert any_db.get(BookingHold, confirmed).status == "CONFIRMED"
    assert all(audit(any_db, h) == [("ACTIVE", "EXPIRED", "sweep")] for h in active)
    assert audit(any_db, confirmed) == []


def test_each_row_of_a_batch_can_have_its_own_values_and_reason(any_db: Session) -> None:
    """A batch of failed refunds, each restarted with its own new key and its own reason, in
    one UPDATE and one audit INSERT; a row no longer FAILED is left alone."""
    rows = any_db.execute(
        text(
            "INSERT INTO payments (gateway, gateway_payment_id, amount, currency, status) "
            "VALUES ('stripe', 'pi_1', 100, 'USD', 'COMPLETED') RETURNING id"
        )
    ).scalar_one()
    ids = [
        any_db.execute(
            text(
                "INSERT INTO refunds (payment_id, amount, currency, status, idempotency_key) "
                "VALUES (:p, 10, 'USD', :s, :k) RETURNING id"
            ),
            {"p": rows, "s": status, "k": f"old-{n}"},
        ).scalar_one()
        for n, status in enumerate(["FAILED", "FAILED", "COMPLETED"])
    ]
    moved = transition_rows(
        any_db,
        "refunds",
        {i: {"idempotency_key": f"new-{i}"} for i in ids},
        "FAILED",
        "PENDING",
        actor="retry",
        reasons={i: f"reason {i}" for i in ids},
        now=NOW,
        values={"gateway_refund_id": None},
    )
    assert moved == ids[:2]
    found = dict(any_db.execute(select(Refund.id, Refund.idempotency_key)).all())
    assert found == {ids[0]: f"new-{ids[0]}", ids[1]: f"new-{ids[1]}", ids[2]: "old-2"}
    trail = any_db.execute(
        select(StateTransition.entity_id, StateTransition.to_status, StateTransition.reason)
        .where(StateTransition.entity == "refunds")
        .order_by(StateTransition.entity_id)
    ).all()
    assert [tuple(row) for row in trail] == [
        (ids[0], "PENDING", f"reason {ids[0]}"),
        (ids[1], "PENDING", f"reason {ids[1]}"),
    ]


def test_batch_transition_rejects_a_disallowed_pair(any_db: Session) -> None:
    with pytest.raises(InvalidTransition):
        transition_batch(
            any_db,
            "booking_holds",
            select(BookingHold.id),
            "EXPIRED",
            "CONFIRMED",
            actor="t",
            reason=None,
            now=NOW,
        )


def test_concurrent_transitions_to_different_final_states_exactly_one_wins(
    committed: Engine,
) -> None:
    """Two real connections race CONFIRMED against EXPIRED on the same 200 holds."""
    with Session(committed) as session:
        holds = add_holds(session, [NOW] * 200)
        session.commit()
    barrier = threading.Barrier(2)
    wins: dict[str, list[int]] = {"CONFIRMED": [], "EXPIRED": []}

    def race(to: str) -> None:
        barrier.wait()
        for hold in holds:
            with Session(committed) as session:
                try:
                    result = transition(
                        session, "booking_holds", hold, to, actor=to, reason=None, now=NOW
                    )
                except InvalidTransition:
                    continue
                session.commit()
                if result.changed:
                    wins[to].append(hold)

    threads = [threading.Thread(target=race, args=(to,)) for to in wins]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins["CONFIRMED"] + wins["EXPIRED"]) == holds
    assert not set(wins["CONFIRMED"]) & set(wins["EXPIRED"])
    with committed.connect() as conn:
        per_hold = conn.execute(
            text(
                "SELECT entity_id, count(*) FROM state_transitions GROUP BY entity_id"
                " HAVING count(*) <> 1"
            )
        ).all()
    assert per_hold == []


def test_claim_skips_rows_locked_by_another_transaction(committed: Engine) -> None:
    with Session(committed) as session:
        holds = add_holds(session, [NOW - timedelta(seconds=i) for i in range(6)])
        session.commit()
    locker = Session(committed)
    locker.execute(select(BookingHold.id).where(BookingHold.id.in_(holds[:3])).with_for_update())
    try:
        with Session(committed) as session:
            ids = transition_batch(
                session,
                "booking_holds",
                claim(
                    select(BookingHold.id)
                    .where(BookingHold.status == "ACTIVE")
                    .order_by(BookingHold.id),
                    10,
                ),
                "ACTIVE",
                "EXPIRED",
                actor="sweep",
                reason=None,
                now=NOW,
            )
            session.commit()
    finally:
        locker.rollback()
        locker.close()
    assert sorted(ids) == holds[3:]
