"""Comparing gateway payments with ours: one query for a whole batch of pages, the safe fixes
through the audited transition helper, everything else recorded as a discrepancy.

Only forward changes the payments state machine allows are made (PENDING -> AUTHORIZED ->
COMPLETED, PENDING/AUTHORIZED -> FAILED), and only when the amounts agree: money never moves
backwards automatically, so a COMPLETED payment the gateway calls failed is flagged for a
person, never changed.
"""

from __future__ import annotations

import functools
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Integer,
    String,
    any_,
    bindparam,
    case,
    cast,
    func,
    insert,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from workers.db import is_postgres
from workers.db.arrays import int_array, text_array
from workers.db.transitions import MACHINES, BatchTransition
from workers.gateways.base import (
    PAYMENT_STATUSES,
    GatewayPayment,
    PaymentPage,
    payment_status,
)
from workers.models import Payment, ReconciliationDiscrepancy, ReconciliationSeen, UTCDateTime
from workers.reconciliation.run_records import RunState

PAYMENTS = Payment.__table__
MONEY_MOVED = ("AUTHORIZED", "COMPLETED")
# Which of an order's payments (a failed attempt, then a captured one) is the order's.
RANK = {"COMPLETED": 3, "AUTHORIZED": 2, "PENDING": 1, "FAILED": 0}


def gateway_status(gateway: str, payment: GatewayPayment) -> str:
    """The gateway's answer in our statuses."""
    return payment_status(gateway, payment.raw_status)


class IdSet:
    """Payment ids, one bit each, in blocks of 65,536 ids: a window's payments sit close
    together in id order, so a million of them take a few hundred KiB where a set of ints
    would take some 60 MiB. The memory of a run stays flat however big its window."""

    SHIFT = 16

    def __init__(self) -> None:
        self.blocks: dict[int, bytearray] = {}
        self.size = 0

    def add(self, value: int) -> None:
        block = self.blocks.get(value >> self.SHIFT)
        if block is None:
            block = self.blocks[value >> self.SHIFT] = bytearray(1 << (self.SHIFT - 3))
        offset = value & 0xFFFF
        bit = 1 << (offset & 7)
        if not block[offset >> 3] & bit:
            block[offset >> 3] |= bit
            self.size += 1

    def update(self, values: Iterable[int]) -> None:
        for value in values:
            self.add(value)

    def add_new(self, values: Iterable[int]) -> list[int]:
        """Add `values`; returns those that were not in the set yet. `add`, inlined: this runs
        once for every payment a run compares."""
        blocks, shift, fresh = self.blocks, self.SHIFT, []
        for value in values:
            block = blocks.get(value >> shift)
            if block is None:
                block = blocks[value >> shift] = bytearray(1 << (shift - 3))
            offset = value & 0xFFFF
            bit = 1 << (offset & 7)
            if not block[offset >> 3] & bit:
                block[offset >> 3] |= bit
                fresh.append(value)
        self.size += len(fresh)
        return fresh

    def __contains__(self, value: int) -> bool:
        block = self.blocks.get(value >> self.SHIFT)
        if block is None:
            return False
        offset = value & 0xFFFF
        return bool(block[offset >> 3] & (1 << (offset & 7)))

    def __len__(self) -> int:
        return self.size


def load_seen(session: Session, run_id: int) -> IdSet:
    """The payments a run compared before it was interrupted."""
    seen = IdSet()
    for (packed,) in session.execute(
        select(ReconciliationSeen.payment_ids).where(ReconciliationSeen.run_id == run_id)
    ):
        ids: array[int] = array("q")
        ids.frombytes(packed)
        seen.update(ids)
    return seen


@dataclass
class Findings:
    """What comparing one batch found, to be written in the batch's transaction."""

    discrepancies: list[dict[str, Any]] = field(default_factory=list)
    fixes: dict[tuple[str, str], list[tuple[int, str, str]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    links: list[dict[str, Any]] = field(default_factory=list)
    compared: list[int] = field(default_factory=list)  # payment ids compared for the first time
    counts: Counter[str] = field(default_factory=Counter)
    minutes: Counter[int] = field(default_factory=Counter)  # compared, by minute of the window

    def add(
        self,
        run_id: int,
        kind: str,
        *,
        payment_id: int | None,
        gateway_payment_id: str | None,
        fixed: bool = False,
        **details: Any,
    ) -> None:
        self.discrepancies.append(
            {
                "run_id": run_id,
                "type": kind,
                "payment_id": payment_id,
                "gateway_payment_id": gateway_payment_id,
                "fixed": fixed,
                "details": details,
            }
        )


@functools.cache
def _matches(postgres: bool, by_order: bool) -> Any:
    """The batch's one query, built once: on Postgres one array parameter per list."""
    if postgres:
        ids = PAYMENTS.c.gateway_payment_id == any_(bindparam("ids", type_=ARRAY(String)))
        orders = PAYMENTS.c.gateway_order_id == any_(bindparam("orders", type_=ARRAY(String)))
    else:
        ids = PAYMENTS.c.gateway_payment_id.in_(bindparam("ids", expanding=True))
        orders = PAYMENTS.c.gateway_order_id.in_(bindparam("orders", expanding=True))
    created = PAYMENTS.c.created_at
    start = bindparam("start", type_=UTCDateTime())
    in_window = (created >= start) & (created < bindparam("end", type_=UTCDateTime()))
    return select(
        PAYMENTS.c.id,
        PAYMENTS.c.gateway_payment_id,
        PAYMENTS.c.gateway_order_id,
        PAYMENTS.c.status,
        PAYMENTS.c.amount,
        PAYMENTS.c.currency,
        case((in_window, minute_of(created, start, postgres))).label("minute"),
    ).where(PAYMENTS.c.gateway == bindparam("gateway"), or_(ids, orders) if by_order else ids)


def minute_of(column: Any, start: Any, postgres: bool) -> Any:
    """The minute of the window a timestamp falls in, counted from the window's start, in
    whole seconds on both databases, so that it is the same as [start + 60 m, start + 60 m +
    60) when the check phase reads one minute."""
    if postgres:
        return cast(func.floor(func.date_part("epoch", column - start) / 60), Integer)
    seconds = cast(func.strftime("%s", column), Integer) - cast(func.strftime("%s", start), Integer)
    return cast(seconds // 60, Integer)


@functools.cache
def _agreeing() -> Any:
    """A batch's listed payments, sent as one array literal per field, matched with ours by gateway
    payment id: the ids and minutes of ours that agree in status and money, and the positions
    (from 1) of the listed payments that do not, or that we do not have by that id."""
    listed = (
        func.unnest(
            cast(bindparam("ids", type_=String()), ARRAY(String)),
            cast(bindparam("statuses", type_=String()), ARRAY(String)),
            cast(bindparam("amounts", type_=String()), ARRAY(BigInteger)),
            cast(bindparam("currencies", type_=String()), ARRAY(String)),
        )
        .table_valued("gateway_payment_id", "status", "amount", "currency", with_ordinality="n")
        .render_derived(name="listed")
    )
    # One index lookup per listed payment, always: as a plain join the planner may merge
    # join instead, reading the whole unique index up to the batch's largest id.
    ours = (
        select(
            PAYMENTS.c.id,
            PAYMENTS.c.status,
            PAYMENTS.c.amount,
            PAYMENTS.c.currency,
            PAYMENTS.c.created_at,
        )
        .where(
            PAYMENTS.c.gateway_payment_id == listed.c.gateway_payment_id,
            PAYMENTS.c.gateway == bindparam("gateway"),
        )
        .limit(1)
        .lateral("ours")
    )
    created = ours.c.created_at
    start = bindparam("start", type_=UTCDateTime())
    in_window = (created >= start) & (created < bindparam("end", type_=UTCDateTime()))
    agrees = func.coalesce(
        (ours.c.status == listed.c.status)
        & (ours.c.amount == listed.c.amount)
        & (func.upper(ours.c.currency) == listed.c.currency),
        False,
    )
    return select(
        func.array_agg(ours.c.id).filter(agrees),
        func.array_agg(case((in_window, minute_of(created, start, True)))).filter(agrees),
        func.array_agg(listed.c.n).filter(~agrees),
    ).select_from(listed.outerjoin(ours, true()))


def compare_batch(
    session: Session, state: RunState, pages: list[PaymentPage], seen: IdSet
) -> Findings:
    """A batch of listed pages compared with ours. Nearly every payment agrees with ours, so on
    PostgreSQL one query settles those: the pages go as arrays, one per field, and come back as
    the ids of ours that agree and the positions of the rest. Only the rest (a difference, a
    payment we do not have, one we know by its order only) become `GatewayPayment`s and go
    through `compare`, one by one. Elsewhere (SQLite, in tests) `compare` does them all."""
    if not is_postgres(session):
        return compare(session, state, (p for page in pages for p in page.items), seen)
    entities: list[dict[str, Any]] = []
    ids: list[str] = []
    raw_statuses: list[str] = []
    amounts: list[int] = []
    currencies: list[str] = []
    for page in pages:
        columns = page.columns()
        entities += page.entities
        ids += columns.ids
        raw_statuses += columns.raw_statuses
        amounts += columns.amounts
        currencies += columns.currencies
    if not ids:
        return Findings()
    repeated = 0
    if len(set(ids)) < len(ids):  # a page shift listed a payment twice: keep its first listing
        first: dict[str, int] = {}
        for n, gateway_payment_id in enumerate(ids):
            first.setdefault(gateway_payment_id, n)
        keep = list(first.values())
        repeated = len(ids) - len(keep)
        entities = [entities[n] for n in keep]
        ids = [ids[n] for n in keep]
        raw_statuses = [raw_statuses[n] for n in keep]
        amounts = [amounts[n] for n in keep]
        currencies = [currencies[n] for n in keep]
    statuses = PAYMENT_STATUSES[state.gateway]
    agreed, minutes, others = (
        session.connection()
        .execute(
            _agreeing(),
            {
                "gateway": state.gateway,
                "ids": text_array(ids),
                "statuses": text_array([statuses.get(raw, "PENDING") for raw in raw_statuses]),
                "amounts": int_array(amounts),
                "currencies": text_array(currencies),
                "start": state.window_start,
                "end": state.window_end,
            },
        )
        .one()
    )
    read = pages[0].read
    findings = compare(session, state, [read(entities[n - 1]) for n in others or ()], seen)
    findings.counts["duplicates"] += repeated
    agreed, minutes = agreed or [], minutes or []
    fresh = seen.add_new(agreed)
    if len(fresh) < len(agreed):  # listed by an earlier batch too (a page shift)
        findings.counts["duplicates"] += len(agreed) - len(fresh)
        new = set(fresh)
        minutes = [minute for id_, minute in zip(agreed, minutes, strict=True) if id_ in new]
    findings.counts["matched"] += len(fresh)
    findings.compared += fresh
    by_minute = Counter(minutes)
    by_minute.pop(None, None)  # ours created outside the window
    findings.minutes.update(by_minute)
    return findings


def compare(
    session: Session, state: RunState, payments: Iterable[GatewayPayment], seen: IdSet
) -> Findings:
    """Compare gateway payments with ours, by gateway payment id, or by order id for a payment
    whose gateway id we never learned (its webhook was lost). A payment this run has already
    compared (listed twice: offset paging shifted) is skipped."""
    run_id, gateway = state.run_id, state.gateway
    listed: dict[str, GatewayPayment] = {}
    findings = Findings()
    for payment in payments:
        if payment.id in listed:  # a page shift repeated it in this batch
            findings.counts["duplicates"] += 1
        else:
            listed[payment.id] = payment
    if not listed:
        return findings
    orders = sorted({p.order_id for p in listed.values() if p.order_id})
    rows = (
        session.connection()
        .execute(
            _matches(is_postgres(session), bool(orders)),
            {
                "gateway": gateway,
                "ids": list(listed),
                "orders": orders,
                "start": state.window_start,
                "end": state.window_end,
            },
        )
        .all()
    )
    by_payment = {row.gateway_payment_id: row for row in rows if row.gateway_payment_id}
    by_order = {row.gateway_order_id: row for row in rows if row.gateway_order_id} if orders else {}
    claimed = _claim_orders(gateway, listed, by_payment, by_order)
    for payment in listed.values():
        row = by_payment.get(payment.id) or claimed.get(payment.id)
        if row is None:
            ours = by_order.get(payment.order_id) if payment.order_id else None
            if ours is not None and gateway_status(gateway, payment) not in MONEY_MOVED:
                findings.counts["other_attempts"] += 1  # an unpaid attempt at one of our orders
                continue
            findings.add(
                run_id,
                "MISSING_IN_DB",
                payment_id=None,
                gateway_payment_id=payment.id,
                gateway_status=payment.raw_status,
                amount=payment.amount,
                currency=payment.currency,
                order_id=payment.order_id,
                created_at=payment.created_at.isoformat(),
            )
            continue
        if row.id in seen:
            findings.counts["duplicates"] += 1
            continue
        seen.add(row.id)
        findings.counts["matched"] += 1
        if row.minute is not None:  # in the window: the check phase counts against these
            findings.minutes[int(row.minute)] += 1
        findings.compared.append(row.id)
        if row.gateway_payment_id is None:
            findings.links.append({"b_id": row.id, "b_gateway_payment_id": payment.id})
        compare_one(findings, run_id, gateway, row, payment)
    return findings


def _claim_orders(
    gateway: str,
    listed: dict[str, GatewayPayment],
    by_payment: dict[str, Any],
    by_order: dict[str, Any],
) -> dict[str, Any]:
    """Our order rows that never learned their payment's gateway id, each claimed by the
    order's furthest-along payment, if money moved (a failed attempt does not pay an order)."""
    best: dict[str, GatewayPayment] = {}
    for payment in listed.values():
        row = by_order.get(payment.order_id) if payment.order_id else None
        if payment.id in by_payment or row is None or row.gateway_payment_id is not None:
            continue
        status = gateway_status(gateway, payment)
        other = best.get(row.gateway_order_id)
        if status in MONEY_MOVED and (
            other is None or RANK[status] > RANK[gateway_status(gateway, other)]
        ):
            best[row.gateway_order_id] = payment
    return {payment.id: by_order[order] for order, payment in best.items()}


def compare_one(
    findings: Findings, run_id: int, gateway: str, row: Any, payment: GatewayPayment
) -> None:
    same_money = row.amount == payment.amount and row.currency.upper() == payment.currency
    if not same_money:
        findings.add(
            run_id,
            "AMOUNT_MISMATCH",
            payment_id=row.id,
            gateway_payment_id=payment.id,
            db_amount=row.amount,
            db_currency=row.currency,
            gateway_amount=payment.amount,
            gateway_currency=payment.currency,
        )
    theirs = gateway_status(gateway, payment)
    if theirs == row.status:
        return
    forward = row.status in MACHINES["payments"].get(theirs, frozenset())
    if forward and same_money:
        # Recorded once the transition says whether it moved the row.
        findings.fixes[(row.status, theirs)].append((row.id, payment.id, payment.raw_status))
        return
    findings.add(
        run_id,
        "STATUS_MISMATCH",
        payment_id=row.id,
        gateway_payment_id=payment.id,
        db_status=row.status,
        gateway_status=payment.raw_status,
        gateway_status_mapped=theirs,
        action="not moved: the amounts differ"
        if forward
        else "not moved: money never moves backwards automatically",
    )


@functools.cache
def _move(postgres: bool, before: str, after: str, actor: str) -> BatchTransition:
    """The audited batch transition of the payments named by `fix_ids`, built once."""
    if postgres:
        ids = Payment.id == any_(bindparam("fix_ids", type_=ARRAY(BigInteger)))
    else:
        ids = Payment.id.in_(bindparam("fix_ids", expanding=True))
    return BatchTransition(
        "payments",
        select(Payment.id).where(ids),
        before,
        after,
        actor=actor,
        reason=f"reconciliation: the gateway says {after}",
    )


@functools.cache
def _record(postgres: bool) -> Any:
    """The discrepancies not yet recorded by this run (a payment listed twice is one
    finding), inserted many rows per statement, returning the types of those inserted."""
    table = ReconciliationDiscrepancy.__table__
    dialect = postgresql if postgres else sqlite
    return (
        dialect.insert(table)
        .on_conflict_do_nothing(index_elements=["run_id", "type", "gateway_payment_id"])
        .returning(table.c.type)
    )


LINK = (
    update(PAYMENTS)
    .where(PAYMENTS.c.id == bindparam("b_id"), PAYMENTS.c.gateway_payment_id.is_(None))
    .values(gateway_payment_id=bindparam("b_gateway_payment_id"))
)


def apply(
    session: Session, state: RunState, findings: Findings, now: datetime, actor: str
) -> Counter[str]:
    """Write what one batch found: links, safe fixes (audited, compare-and-set), the payments
    compared, and the discrepancies this run has not recorded yet. Returns the counts to add
    to the run's."""
    written = Counter(findings.counts)
    if findings.minutes:
        matched = state.minutes()
        for minute, count in findings.minutes.items():
            if 0 <= minute < len(matched):
                matched[minute] += count
    if findings.links:
        session.execute(LINK, findings.links)
        written["linked"] += len(findings.links)
    postgres = is_postgres(session)
    for (before, after), fixes in findings.fixes.items():
        move = _move(postgres, before, after, actor)
        changed = set(move(session, now, {"fix_ids": [fix[0] for fix in fixes]}))
        written["fixed"] += len(changed)
        for payment_id, gateway_payment_id, raw in fixes:
            moved = payment_id in changed
            findings.add(
                state.run_id,
                "STATUS_MISMATCH",
                payment_id=payment_id,
                gateway_payment_id=gateway_payment_id,
                fixed=moved,
                db_status=before,
                gateway_status=raw,
                gateway_status_mapped=after,
                # Not moved: another writer changed the status since we read it.
                action=f"moved {before} -> {after}" if moved else "not moved: changed meanwhile",
            )
    if findings.compared and state.phase == "list":
        batch = int(state.progress.get("batches", 0)) + 1
        state.progress["batches"] = batch
        session.execute(
            insert(ReconciliationSeen).values(
                run_id=state.run_id,
                batch=batch,
                payment_ids=array("q", findings.compared).tobytes(),
            )
        )
    if findings.discrepancies:
        added = list(
            session.connection().execute(_record(postgres), findings.discrepancies).scalars()
        )
        written.update(added)
        # A fix is recorded with its payment's first comparison, which the unique index
        # never turns away: every other row added waits for a person.
        fixed = sum(1 for row in findings.discrepancies if row["fixed"])
        written["flagged"] += len(added) - fixed
    return written
