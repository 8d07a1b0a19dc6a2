"""The one audited, idempotent transition helper through which every status changes.

A transition is a compare-and-set in SQL (`UPDATE ... WHERE id = :id AND status = :seen`), and
its `state_transitions` audit row is written in the same transaction. Repeating a transition
already made is a no-op; a transition the entity's state machine does not allow is an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    Table,
    any_,
    bindparam,
    column,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy import values as sa_values
from sqlalchemy.orm import Session

from workers.db.locks import is_postgres
from workers.errors import NotFound, PermanentError, TransientError
from workers.models import (
    Base,
    BookingHold,
    DeadLetter,
    Notification,
    Payment,
    ReconciliationDiscrepancy,
    ReconciliationRun,
    Refund,
    StateTransition,
    UTCDateTime,
)

# entity (table name) -> {to_status: statuses it may be reached from}
MACHINES: dict[str, dict[str, frozenset[str]]] = {
    "booking_holds": {
        "CONFIRMED": frozenset({"ACTIVE"}),
        "EXPIRED": frozenset({"ACTIVE"}),
        "RELEASED": frozenset({"ACTIVE"}),
    },
    "payments": {
        "AUTHORIZED": frozenset({"PENDING"}),
        "COMPLETED": frozenset({"AUTHORIZED", "PENDING"}),
        "FAILED": frozenset({"PENDING", "AUTHORIZED"}),
    },
    "refunds": {
        "PROCESSING": frozenset({"PENDING"}),
        "COMPLETED": frozenset({"PENDING", "PROCESSING"}),
        "FAILED": frozenset({"PENDING", "PROCESSING"}),
        "PENDING": frozenset({"FAILED"}),
    },
    "notifications": {
        "SENT": frozenset({"PENDING"}),
        "DEAD": frozenset({"PENDING"}),
        "PENDING": frozenset({"DEAD"}),  # an operator's replay of a dead notification
    },
    "dead_letters": {
        # Added to the contract's machine: a replay that failed again is a new failure,
        # triaged again (its replay budget decides).
        "NEW": frozenset({"RETRYING"}),
        "RETRYING": frozenset({"NEW", "MANUAL_REVIEW"}),
        "REPLAYED": frozenset({"RETRYING"}),
        "MANUAL_REVIEW": frozenset({"NEW", "RETRYING"}),
        "DISCARDED": frozenset({"NEW", "RETRYING", "MANUAL_REVIEW"}),
    },
    "reconciliation_runs": {
        "RUNNING": frozenset({"PENDING", "FAILED"}),
        "COMPLETED": frozenset({"RUNNING"}),
        "FAILED": frozenset({"PENDING", "RUNNING"}),
    },
    # A finding's review by a person (the finding itself never changes).
    "reconciliation_discrepancies": {
        "ACKNOWLEDGED": frozenset({"OPEN"}),
        "RESOLVED": frozenset({"OPEN", "ACKNOWLEDGED"}),
    },
}

# A row whose status changes between our read and our write is read again; this many times.
MAX_CAS_ROUNDS = 10

MODELS: dict[str, type[Base]] = {
    model.__tablename__: model
    for model in (
        BookingHold,
        Payment,
        Refund,
        Notification,
        DeadLetter,
        ReconciliationRun,
        ReconciliationDiscrepancy,
    )
}


class InvalidTransition(PermanentError):
    """The entity's state machine does not allow this change from its current status."""

    def __init__(self, entity: str, entity_id: int, current: str, to: str) -> None:
        super().__init__(f"{entity} {entity_id}: {current} -> {to} is not allowed")
        self.entity, self.entity_id, self.current, self.to = entity, entity_id, current, to


@dataclass(frozen=True)
class Transition:
    """What `transition` did: `changed` is False for a repeat, or when `guard` held it back."""

    entity: str
    entity_id: int
    from_status: str
    to_status: str
    changed: bool


def audit(
    session: Session,
    entity: str,
    reasons: Mapping[int, str | None],
    from_status: str,
    to: str,
    *,
    actor: str,
    now: datetime,
) -> None:
    """The audit rows of a change: one per row id, with its own reason, in one INSERT."""
    if reasons:
        session.execute(
            insert(StateTransition.__table__),
            [
                {
                    "entity": entity,
                    "entity_id": key,
                    "from_status": from_status,
                    "to_status": to,
                    "actor": actor,
                    "reason": reason,
                    "at": now,
                }
                for key, reason in reasons.items()
            ],
        )


def sources(entity: str, to: str) -> frozenset[str]:
    try:
        return MACHINES[entity][to]
    except KeyError:
        raise PermanentError(f"{entity}: no transition leads to {to!r}") from None


def transition(
    session: Session,
    entity: str,
    entity_id: int,
    to: str,
    *,
    actor: str,
    reason: str | None,
    now: datetime,
    values: Mapping[str, Any] | None = None,
    guard: ColumnElement[bool] | None = None,
) -> Transition:
    """Move one row to status `to` if its state machine allows it from the current status.

    `values` are further columns set in the same UPDATE; `guard` is an extra condition the row
    must meet at the moment of the change (e.g. `expires_at <= now`). The row is compared and
    set in one statement, so a concurrent change between our read and our write makes the
    UPDATE match nothing, and we look again.
    """
    model = MODELS[entity]
    table = model.__table__
    allowed = sources(entity, to)
    for _ in range(MAX_CAS_ROUNDS):
        current = session.execute(
            select(table.c.status).where(table.c.id == entity_id)
        ).scalar_one_or_none()
        if current is None:
            raise NotFound(f"{entity} {entity_id} does not exist")
        if current == to:
            return Transition(entity, entity_id, current, to, changed=False)
        if current not in allowed:
            raise InvalidTransition(entity, entity_id, current, to)
        stmt = (
            update(table)
            .where(table.c.id == entity_id, table.c.status == current)
            .values(status=to, updated_at=now, **dict(values or {}))
        )
        if guard is not None:
            stmt = stmt.where(guard)
        if session.execute(stmt).rowcount == 1:
            audit(session, entity, {entity_id: reason}, current, to, actor=actor, now=now)
            return Transition(entity, entity_id, current, to, changed=True)
        if guard is not None:
            still = session.execute(
                select(table.c.status).where(table.c.id == entity_id)
            ).scalar_one_or_none()
            if still == current:  # the status is unchanged, so the guard held us back
                return Transition(entity, entity_id, current, to, changed=False)
    raise TransientError(f"{entity} {entity_id}: status kept changing under {to} transition")


def update_each(
    session: Session,
    table: Table,
    changes: Mapping[int, Mapping[str, Any]],
    *,
    values: Mapping[str, Any] | None = None,
    where: ColumnElement[bool] | None = None,
) -> list[int]:
    """Set each row's own column values (`changes[id]`, the same columns for every row) and
    `values` on all of them, where `where` still holds, in one statement on Postgres (UPDATE
    ... FROM (VALUES ...)); returns the ids changed. SQLite: the transaction holds the write
    lock, so it reads which rows qualify, then updates them."""
    if not changes:
        return []
    names = sorted(next(iter(changes.values())))
    common = dict(values or {})
    conditions = [] if where is None else [where]
    if is_postgres(session):
        given = sa_values(
            column("id", table.c.id.type),
            *(column(name, table.c[name].type) for name in names),
            name="given",
        ).data([(key, *(row[name] for name in names)) for key, row in changes.items()])
        return sorted(
            session.execute(
                update(table)
                .where(table.c.id == given.c.id, *conditions)
                .values(**common, **{name: given.c[name] for name in names})
                .returning(table.c.id)
            ).scalars()
        )
    found = list(
        session.execute(
            select(table.c.id).where(table.c.id.in_(list(changes)), *conditions)
        ).scalars()
    )
    if found:
        session.execute(
            update(table).where(table.c.id == bindparam("target")),
            [{"target": key, **common, **changes[key]} for key in found],
        )
    return sorted(found)


def transition_rows(
    session: Session,
    entity: str,
    changes: Mapping[int, Mapping[str, Any]],
    from_status: str,
    to: str,
    *,
    actor: str,
    reasons: Mapping[int, str],
    now: datetime,
    values: Mapping[str, Any] | None = None,
) -> list[int]:
    """Move these rows (already locked by the caller) from `from_status` to `to`, each with its
    own column values (`changes[id]`, the same columns for every row) and its own reason, in
    one UPDATE and one INSERT of audit rows; `values` are set on all of them. Rows no longer
    in `from_status` are left as they are. Returns the ids that moved."""
    if from_status not in sources(entity, to):
        raise InvalidTransition(entity, 0, from_status, to)
    if not changes:
        return []
    table = MODELS[entity].__table__
    moved = update_each(
        session,
        table,
        changes,
        values={"status": to, "updated_at": now, **dict(values or {})},
        where=table.c.status == from_status,
    )
    reasons_moved = {key: reasons.get(key) for key in moved}
    audit(session, entity, reasons_moved, from_status, to, actor=actor, now=now)
    return sorted(moved)


def audited_update(
    session: Session,
    entity: str,
    entity_id: int,
    *,
    actor: str,
    reason: str,
    now: datetime,
    values: Mapping[str, Any],
    guard: ColumnElement[bool] | None = None,
) -> bool:
    """A change an operator makes that is not a status change (clearing a refund's manual
    review): `values` set in one UPDATE, while `guard` holds, and an audit row from the
    row's status to itself, so the trail shows who did it and why. False if the guard held it
    back; NotFound if there is no such row."""
    table = MODELS[entity].__table__
    stmt = (
        update(table)
        .where(table.c.id == entity_id)
        .values(updated_at=now, **dict(values))
        .returning(table.c.status)
    )
    if guard is not None:
        stmt = stmt.where(guard)
    status = session.execute(stmt).scalar_one_or_none()
    if status is None:
        exists = session.execute(select(table.c.id).where(table.c.id == entity_id)).first()
        if exists is None:
            raise NotFound(f"{entity} {entity_id} does not exist")
        return False
    audit(session, entity, {entity_id: reason}, status, status, actor=actor, now=now)
    return True


# The clock of a batch transition, bound at each run so that one built statement serves them all.
NOW = bindparam("now", type_=UTCDateTime())


class BatchTransition:
    """Move every row a claim selects from `from_status` to `to`, with one audit row each.

    `claimed` selects ids, normally through `locks.claim` (LIMIT n FOR UPDATE SKIP LOCKED); it,
    `values` and `guard` may use `NOW`, bound to the run's clock. On Postgres the claim, the
    compare-and-set UPDATE and the audit INSERT are one statement. The statements are built
    once: a sweep keeps one BatchTransition and runs it batch after batch, which spares
    SQLAlchemy rebuilding and re-keying a large statement every time.
    """

    def __init__(
        self,
        entity: str,
        claimed: Select[tuple[int]],
        from_status: str,
        to: str,
        *,
        actor: str,
        reason: str | None,
        values: Mapping[str, Any] | None = None,
        guard: ColumnElement[bool] | None = None,
    ) -> None:
        if from_status not in sources(entity, to):
            raise InvalidTransition(entity, 0, from_status, to)
        self.entity, self.claimed, self.from_status, self.to = entity, claimed, from_status, to
        self.actor, self.reason = actor, reason
        table = MODELS[entity].__table__
        self.table = table
        self.conditions = [table.c.status == from_status]
        if guard is not None:
            self.conditions.append(guard)
        self.assignments = {"status": to, "updated_at": NOW, **dict(values or {})}
        self._postgres = self._build_postgres()
        self._sqlite_update = (
            update(table)
            .where(table.c.id.in_(bindparam("ids", expanding=True)), *self.conditions)
            .values(**self.assignments)
            .returning(table.c.id)
        )

    def _build_postgres(self) -> Any:
        table, audit = self.table, StateTransition.__table__
        batch = self.claimed.cte("claimed")
        # `id = ANY(ARRAY(claimed))` keeps every row lookup on the primary key; joining the CTE
        # instead lets the planner hash-join over all due rows once they are a large share of
        # the table, which makes each batch of a big backlog slower than the last.
        changed = (
            update(table)
            .where(
                table.c.id == any_(func.array(select(batch.c.id).scalar_subquery())),
                *self.conditions,
            )
            .values(**self.assignments)
            .returning(table.c.id)
            .cte("changed")
        )
        rows = select(
            literal(self.entity),
            changed.c.id,
            literal(self.from_status),
            literal(self.to),
            literal(self.actor),
            literal(self.reason),
            NOW,
        )
        return insert(audit).from_select(AUDIT_COLUMNS, rows).returning(audit.c.entity_id)

    def __call__(
        self, session: Session, now: datetime, params: Mapping[str, Any] | None = None
    ) -> list[int]:
        """Run one batch in the session's transaction; returns the ids that changed. `params`
        binds the claim's own parameters (the ids to move, say)."""
        bound = {**(params or {}), "now": now}
        if is_postgres(session):
            return list(session.execute(self._postgres, bound).scalars())
        # SQLite: the transaction already holds the write lock, so three statements are as safe.
        ids = list(session.execute(self.claimed, bound).scalars())
        if not ids:
            return []
        changed = list(session.execute(self._sqlite_update, {"ids": ids, "now": now}).scalars())
        reasons = dict.fromkeys(changed, self.reason)
        audit(session, self.entity, reasons, self.from_status, self.to, actor=self.actor, now=now)
        return changed


AUDIT_COLUMNS = ["entity", "entity_id", "from_status", "to_status", "actor", "reason", "at"]


def transition_batch(
    session: Session,
    entity: str,
    claimed: Select[tuple[int]],
    from_status: str,
    to: str,
    *,
    actor: str,
    reason: str | None,
    now: datetime,
    values: Mapping[str, Any] | None = None,
    guard: ColumnElement[bool] | None = None,
) -> list[int]:
    """One batch transition, built and run once (see `BatchTransition`)."""
    batch = BatchTransition(
        entity, claimed, from_status, to, actor=actor, reason=reason, values=values, guard=guard
    )
    return batch(session, now)
