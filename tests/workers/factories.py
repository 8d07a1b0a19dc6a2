"""Rows for tests, written with plain SQL-level inserts as another service would."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from workers.db import session_scope
from workers.models import BookingHold, Payment, Refund


def add_holds(session: Session, expires: list[datetime], status: str = "ACTIVE") -> list[int]:
    rows = [
        {
            "resource_id": f"r{i}",
            "user_id": f"u{i}",
            "start_time": at + timedelta(hours=1),
            "end_time": at + timedelta(hours=2),
            "expires_at": at,
            "status": status,
        }
        for i, at in enumerate(expires)
    ]
    return list(session.execute(insert(BookingHold).returning(BookingHold.id), rows).scalars())


def add_hold(session: Session, expires_at: datetime, status: str = "ACTIVE") -> int:
    return add_holds(session, [expires_at], status)[0]


CURRENCY = {"razorpay": "INR", "stripe": "USD"}
CAPTURED = {"razorpay": "captured", "stripe": "succeeded"}


def add_refund(
    sim: Any,
    gateway: str,
    amount: int = 1_000,
    paid: int = 50_000,
    created_at: datetime | None = None,
) -> int:
    gateway_payment = sim.add_payment(
        gateway, amount=paid, currency=CURRENCY[gateway], status=CAPTURED[gateway]
    )["id"]
    with session_scope() as session:
        payment = session.execute(
            insert(Payment)
            .values(
                gateway=gateway,
                gateway_payment_id=gateway_payment,
                amount=paid,
                currency=CURRENCY[gateway],
                status="COMPLETED",
            )
            .returning(Payment.id)
        ).scalar_one()
        return int(
            session.execute(
                insert(Refund)
                .values(
                    payment_id=payment,
                    amount=amount,
                    currency=CURRENCY[gateway],
                    reason="cancelled",
                    # Unset, the server defaults stand, as for another service's INSERT.
                    **({"created_at": created_at, "updated_at": created_at} if created_at else {}),
                )
                .returning(Refund.id)
            ).scalar_one()
        )
