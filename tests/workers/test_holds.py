"""Hold expiry as plain functions, on Postgres and on SQLite."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest
import redis as redis_lib
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from tests.conftest import utc
from tests.workers.factories import add_hold, add_holds
from workers.db import Steps, session_scope
from workers.errors import NotFound
from workers.holds.expiry import expire_hold, notify_expired, sweep_expired_holds
from workers.models import BookingHold, Notification, StateTransition

NOW = utc(2026, 3, 1, 9)


def status(session: Session, hold: int) -> str:
    return session.get(BookingHold, hold).status


def test_due_active_hold_is_expired_with_audit_row(any_db: Session) -> None:
    hold = add_hold(any_db, NOW - timedelta(seconds=1))
    outcome = expire_hold(any_db, hold, NOW)
    assert outcome.result == "expired"
    row = any_db.get(BookingHold, hold)
    assert (row.status, row.released_at) == ("EXPIRED", NOW)
    audit = any_db.scalars(select(StateTransition)).one()
    assert (audit.entity_id, audit.from_status, audit.to_status, audit.actor) == (
        hold,
        "ACTIVE",
        "EXPIRED",
        "holds.expire",
    )


def test_hold_not_yet_due_is_left_active(any_db: Session) -> None:
    hold = add_hold(any_db, NOW + timedelta(seconds=30))
    outcome = expire_hold(any_db, hold, NOW)
    assert (outcome.result, outcome.expires_at) == ("not_due", NOW + timedelta(seconds=30))
    assert status(any_db, hold) == "ACTIVE"


@pytest.mark.parametrize("final", ["CONFIRMED", "EXPIRED", "RELEASED"])
def test_final_hold_is_a_no_op(any_db: Session, final: str) -> None:
    hold = add_hold(any_db, NOW - timedelta(minutes=1), status=final)
    assert expire_hold(any_db, hold, NOW).result == "already_final"
    assert status(any_db, hold) == final
    assert any_db.scalar(select(func.count()).select_from(StateTransition)) == 0


def test_unknown_hold_is_a_permanent_error(any_db: Session) -> None:
    with pytest.raises(NotFound, match="booking_holds 987654 does not exist"):
        expire_hold(any_db, 987654, NOW)


def test_expiry_enqueues_its_follow_up_only_after_commit(
    committed: Engine, redis: redis_lib.Redis
) -> None:
    with session_scope() as session:
        hold = add_hold(session, NOW)
    with session_scope() as session:
        expire_hold(session, hold, NOW)
        session.flush()
        assert redis.llen("default") == 0  # not sent inside the transaction
    message = json.loads(redis.lindex("default", 0))
    assert message["headers"]["task"] == "holds.expired"
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert (args, kwargs) == ([], {"hold_ids": [hold]})


def test_rolled_back_expiry_sends_nothing(committed: Engine, redis: redis_lib.Redis) -> None:
    with session_scope() as session:
        hold = add_hold(session, NOW)
    with pytest.raises(RuntimeError), session_scope() as session:
        expire_hold(session, hold, NOW)
        raise RuntimeError("crash before commit")
    assert redis.llen("default") == 0
    with session_scope() as session:
        assert status(session, hold) == "ACTIVE"


def test_sweep_expires_exactly_the_due_active_holds_in_batches(any_db: Session) -> None:
    due = add_holds(any_db, [NOW - timedelta(seconds=s) for s in range(25)])
    later = add_holds(any_db, [NOW + timedelta(seconds=1)] * 3)
    confirmed = add_hold(any_db, NOW - timedelta(hours=1), status="CONFIRMED")
    result = sweep_expired_holds(Steps(any_db), lambda: NOW, batch_size=10, time_budget=60)
    assert (result.expired, result.batches) == (25, 3)
    statuses = dict(any_db.execute(select(BookingHold.id, BookingHold.status)).all())
    assert {statuses[h] for h in due} == {"EXPIRED"}
    assert {statuses[h] for h in later} == {"ACTIVE"}
    assert statuses[confirmed] == "CONFIRMED"
    assert (
        any_db.scalar(
            select(func.count())
            .select_from(StateTransition)
            .where(StateTransition.actor == "holds.sweep_expired")
        )
        == 25
    )


def test_sweep_stops_at_its_time_budget(any_db: Session) -> None:
    add_holds(any_db, [NOW - timedelta(seconds=s) for s in range(30)])
    result = sweep_expired_holds(Steps(any_db), lambda: NOW, batch_size=10, time_budget=0)
    assert (result.expired, result.batches) == (10, 1)


def test_sweep_reads_due_holds_through_the_partial_index(db: Session) -> None:
    query = (
        select(BookingHold.id)
        .where(BookingHold.status == "ACTIVE", BookingHold.expires_at <= NOW)
        .order_by(BookingHold.expires_at)
        .limit(1000)
    )
    compiled = query.compile(db.get_bind())
    connection = db.connection()
    connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
    plan = connection.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {compiled}", compiled.params).scalar()
    assert "ix_booking_holds_active_expires_at" in json.dumps(plan)


def test_follow_up_writes_one_notification_per_hold_however_often_it_runs(
    any_db: Session,
) -> None:
    holds = add_holds(any_db, [NOW] * 3)
    any_db.execute(
        update(BookingHold).where(BookingHold.id.in_(holds[:2])).values(status="EXPIRED")
    )
    assert notify_expired(any_db, holds) == 2
    assert notify_expired(any_db, holds) == 0
    rows = any_db.scalars(select(Notification).order_by(Notification.id)).all()
    assert [row.dedupe_key for row in rows] == [f"hold-expired:{h}" for h in holds[:2]]
    assert rows[0].recipient == "user:u0" and rows[0].data["hold_id"] == holds[0]
