"""Many dead letters at once: the one batched, audited path that `backstop dlq replay|discard
--all`, the console's bulk actions and the `dlq.bulk` task take, and that triage shares.

Per batch of letters: one locking SELECT (two bulk actions over the same letters act on each
exactly once), each task's precheck over all its letters at
once, one audited batch transition per (from, to) pair, one INSERT of `dead_letter_events`
rows, and the replays sent after commit by `dlq.dispatch` tasks, a few hundred letters each.
A selection is frozen when the operator sees its count: the filters' clock and the newest
letter id then; letters that arrive later are not taken.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from workers.application import app
from workers.db import Steps, analyze_if_stale, transition_batch, update_each
from workers.dead_letters import HEADER, add_events, event
from workers.dlq.browse import Filters
from workers.dlq.replay import OPEN, UNNECESSARY, run_prechecks
from workers.messaging.enqueue import enqueue_after_commit, send
from workers.models import DeadLetter

log = logging.getLogger("backstop.dlq")

REPLAYABLE = ("NEW", "MANUAL_REVIEW")
ACTIONS = {"replay": REPLAYABLE, "discard": OPEN}
BATCH = 5000
DISPATCH_CHUNK = 500


@dataclass(frozen=True)
class Selection:
    """The open letters an action takes: the filters, read at `now`, among letters up to id
    `up_to` (None: every letter there is)."""

    filters: Filters
    now: datetime
    up_to: int | None = None

    def query(self, action: str) -> Select[Any]:
        allowed = ACTIONS[action]
        wanted = self.filters.statuses
        statuses = [s for s in wanted if s in allowed] if wanted else list(allowed)
        query = Filters(**{**self.filters.__dict__, "statuses": ()}).select(self.now)
        query = query.where(DeadLetter.status.in_(statuses))
        if self.up_to is not None:
            # Only what the operator was shown: no letter that arrived, or changed (a failed
            # replay back to NEW, a stale one to manual review), after the count.
            query = query.where(DeadLetter.id <= self.up_to, DeadLetter.updated_at <= self.now)
        return query


@dataclass
class Preview:
    """What an action would take: the count by task, and the newest id (the selection's
    `up_to`, so that the action takes no letter the operator was not shown)."""

    count: int
    up_to: int | None
    by_task: list[tuple[str, int]]


def preview(session: Session, selection: Selection, action: str) -> Preview:
    chosen = selection.query(action).subquery()
    rows = session.execute(
        select(chosen.c.task_name, func.count(), func.max(chosen.c.id))
        .group_by(chosen.c.task_name)
        .order_by(func.count().desc(), chosen.c.task_name)
    ).all()
    newest = max((row[2] for row in rows), default=None)
    return Preview(
        count=sum(row[1] for row in rows),
        up_to=selection.up_to if selection.up_to is not None else newest,
        by_task=[(row[0], row[1]) for row in rows],
    )


@dataclass
class BulkCounts:
    taken: int = 0
    replayed: int = 0
    unnecessary: int = 0
    discarded: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


Progress = Callable[[BulkCounts], None]


def act_on_selection(
    steps: Steps,
    selection: Selection,
    action: str,
    *,
    actor: str,
    reason: str,
    now: datetime,
    batch_size: int = BATCH,
    progress: Progress | None = None,
) -> BulkCounts:
    """Replay or discard every open letter the selection takes, a committed batch at a time.
    Each batch is locked (`FOR UPDATE`, waiting: a letter another action or triage holds is
    read again once it lets go, and taken only if it is still open), so two bulk actions over
    the same letters act on each exactly once, and none is skipped because it was busy. A
    batch that comes back short is not the end (rows that stopped matching drop out of it):
    the run ends at an empty batch."""
    if not reason.strip():
        raise ValueError(f"a bulk {action} needs a reason")
    counts = BulkCounts()
    if not steps.dry_run:  # a dry run's ANALYZE would be undone, and still reset the counter
        with steps.step("statistics") as session:
            analyze_if_stale(session, DeadLetter.__tablename__)
    after = 0
    query = selection.query(action).with_only_columns(
        DeadLetter.id, DeadLetter.task_name, DeadLetter.status, DeadLetter.payload
    )
    while True:
        with steps.step(f"bulk {action}") as session:
            rows = session.execute(
                query.where(DeadLetter.id > after)
                .order_by(DeadLetter.id)
                .limit(batch_size)
                .with_for_update(of=DeadLetter)
            ).all()
            if not rows:
                return counts
            after = rows[-1].id
            if action == "replay":
                replay_rows(session, rows, actor, reason, now, counts)
            else:
                discard_rows(session, rows, actor, reason, now, counts)
        if progress is not None:
            progress(counts)


def replay_rows(
    session: Session,
    rows: Sequence[Any],
    actor: str,
    reason: str,
    now: datetime,
    counts: BulkCounts,
) -> None:
    """Claimed letters (id, task_name, status, payload): each task's precheck over its letters
    at once; unnecessary ones closed with what it said, the rest RETRYING and dispatched."""
    counts.taken += len(rows)
    by_task: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        by_task[row.task_name].append(row)
    moves: dict[tuple[str, str], list[int]] = defaultdict(list)
    resolutions: dict[int, str] = {}
    for task_name, letters in by_task.items():
        answers = run_prechecks(session, task_name, [row.payload for row in letters], actor)
        for row, unnecessary in zip(letters, answers, strict=True):
            if unnecessary is None:
                moves[(row.status, "RETRYING")].append(row.id)
            else:
                resolutions[row.id] = f"replay unnecessary: {unnecessary}"
                moves[(row.status, "DISCARDED")].append(row.id)
    events, replaying = [], []
    for (source, to), ids in moves.items():
        if to == "RETRYING":
            moved = move(session, ids, source, to, actor, reason, now, replay=True)
            counts.replayed += len(moved)
            replaying += moved
            events += [event(i, "replayed", actor, reason, now) for i in moved]
        else:
            moved = move(session, ids, source, to, actor, f"{UNNECESSARY} ({reason})", now)
            counts.unnecessary += len(moved)
            events += [
                event(i, "replay_unnecessary", actor, reason, now, why=resolutions[i])
                for i in moved
            ]
    record_resolutions(session, resolutions)
    add_events(session, events)
    send_replays(session, sorted(replaying))


def discard_rows(
    session: Session,
    rows: Sequence[Any],
    actor: str,
    reason: str,
    now: datetime,
    counts: BulkCounts,
) -> None:
    counts.taken += len(rows)
    by_status: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        by_status[row.status].append(row.id)
    events = []
    for source, ids in by_status.items():
        moved = move(session, ids, source, "DISCARDED", actor, reason, now, resolution=reason)
        counts.discarded += len(moved)
        events += [event(i, "discarded", actor, reason, now) for i in moved]
    add_events(session, events)


def move(
    session: Session,
    ids: Sequence[int],
    source: str,
    to: str,
    actor: str,
    reason: str,
    now: datetime,
    *,
    replay: bool = False,
    resolution: str | None = None,
) -> list[int]:
    """One audited batch transition of these (already locked) letters."""
    assign: dict[str, Any] = {"rule": "manual"}
    if replay:
        assign.update(replays=DeadLetter.replays + 1, last_replayed_at=now)
    if resolution is not None:
        assign["resolution"] = resolution
    return transition_batch(
        session,
        "dead_letters",
        select(DeadLetter.id).where(DeadLetter.id.in_(list(ids))),
        source,
        to,
        actor=actor,
        reason=reason,
        now=now,
        values=assign,
    )


def record_resolutions(session: Session, resolutions: dict[int, str]) -> None:
    """Each letter's own resolution (what its precheck said), in one statement."""
    changes = {key: {"resolution": why} for key, why in resolutions.items()}
    update_each(session, DeadLetter.__table__, changes)


def send_replays(session: Session, letter_ids: Sequence[int]) -> None:
    """The replays go out through `dlq.dispatch` tasks, a few hundred letters each, once the
    session commits: the workers send them in parallel, and a large backlog's decisions are not
    spent sending."""
    for start in range(0, len(letter_ids), DISPATCH_CHUNK):
        chunk = list(letter_ids[start : start + DISPATCH_CHUNK])
        enqueue_after_commit(session, "dlq.dispatch", {"dead_letter_ids": chunk})


def dispatch(session: Session, letter_ids: Sequence[int]) -> int:
    """Send the replays of these letters that are still RETRYING (one of them discarded
    meanwhile is not sent). Sent now, on one producer: the letters were committed already."""
    rows = session.execute(
        select(DeadLetter.id, DeadLetter.task_name, DeadLetter.payload)
        .where(DeadLetter.id.in_(list(letter_ids)), DeadLetter.status == "RETRYING")
        .order_by(DeadLetter.id)
    ).all()
    with app.producer_or_acquire() as producer:
        for row in rows:
            send(row.task_name, row.payload, headers={HEADER: row.id}, producer=producer)
    return len(rows)
