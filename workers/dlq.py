"""The dead-letter queue: where every task's terminal failure is kept, payload and all; its
triage (rules in `workers/dlq_rules.py`), and the operator's replay and discard.

A replay sends the letter's task again, by name, as a fresh message carrying the letter's id in
a header. The base task closes the letter in the same transaction as the replayed work when it
succeeds (RETRYING -> REPLAYED), or records the new failure on the same letter when it fails
again (RETRYING -> NEW, to be triaged again, its replay budget deciding). Every status change
goes through the audited transition helper (actor, reason, time in `state_transitions`);
`dead_letter_events` adds what the audit row cannot hold: the rule, the edit's diff, the replay
task's id.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Text, column, select, update, values
from sqlalchemy.orm import Session

from workers.application import app, registered_tasks
from workers.db import claim, is_postgres, transition, transition_batch
from workers.dead_letters import (
    HEADER,
    add_events,
    event,
)
from workers.dlq_rules import RULES, Rule, match
from workers.enqueue import enqueue_after_commit, send
from workers.errors import PermanentError
from workers.models import DeadLetter
from workers.payloads import validate

log = logging.getLogger("backstop.dlq")

OPEN = ("NEW", "RETRYING", "MANUAL_REVIEW")


# -- replay preconditions ------------------------------------------------------------------------


def run_prechecks(
    session: Session, task_name: str, payloads: list[dict[str, Any]], actor: str
) -> list[str | None]:
    """The task's own precheck of each payload (declared with the task: `task(...,
    precheck=...)` or `batch_precheck=`): why each replay is unnecessary, or None."""
    task = registered_tasks().get(task_name)
    batch = getattr(task, "batch_precheck", None)
    if batch is not None:
        return list(batch(session, payloads, actor))
    single = getattr(task, "precheck", None)
    if single is None:
        return [None] * len(payloads)
    return [single(session, payload, actor) for payload in payloads]


def send_replay(session: Session, letter_id: int, task_name: str, payload: dict[str, Any]) -> None:
    enqueue_after_commit(session, task_name, payload, headers={HEADER: letter_id})


UNNECESSARY = "replay unnecessary: the task's precheck found nothing left to do (see resolution)"

# -- triage ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TriagePolicy:
    manual_after: timedelta  # older letters go to manual review instead of being replayed
    replay_budget: int  # automatic replays per letter
    stale_after: timedelta  # a replay with no outcome after this long: manual review
    batch_size: int = 5000
    rules: tuple[Rule, ...] = RULES


@dataclass
class TriageCounts:
    replayed: int = 0
    manual_review: int = 0
    discarded: int = 0
    unnecessary: int = 0  # a replay the precheck found nothing left to do for
    reclassified: int = 0
    stale: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def triage(
    session: Session,
    now: datetime,
    policy: TriagePolicy,
    actor: str = "dlq.triage",
) -> TriageCounts:
    """One triage run: re-sort open letters by the rules' classifications, give up on replays
    that never reported back, then decide every NEW letter, batch by batch, each batch claimed
    with SKIP LOCKED and committed (two runs at once split the letters, none is replayed twice).
    Replays are sent after their batch commits."""
    counts = TriageCounts()
    counts.reclassified = reclassify(session, policy.rules, now)
    counts.stale = give_up_stale(session, now, policy, actor)
    session.commit()
    while True:
        taken = triage_batch(session, now, policy, actor, counts)
        session.commit()
        if taken < policy.batch_size:
            return counts


def reclassify(session: Session, rules: tuple[Rule, ...], now: datetime) -> int:
    """Apply every rule's `reclassify` to the NEW and MANUAL_REVIEW letters it matches, one
    statement per rule. NEW ones are then decided under their new classification; ones in
    manual review stay there, correctly labelled, for `backstop dlq replay --all
    --classification ...`."""
    changed = 0
    for rule in rules:
        if rule.reclassify is None:
            continue
        changed += session.execute(
            update(DeadLetter)
            .where(
                DeadLetter.status.in_(("NEW", "MANUAL_REVIEW")),
                DeadLetter.classification != rule.reclassify,
                rule.where(),
            )
            .values(classification=rule.reclassify, rule=rule.name, updated_at=now)
            .execution_options(synchronize_session=False)
        ).rowcount
    return changed


def give_up_stale(session: Session, now: datetime, policy: TriagePolicy, actor: str) -> int:
    stale = claim(
        select(DeadLetter.id)
        .where(
            DeadLetter.status == "RETRYING",
            DeadLetter.last_replayed_at <= now - policy.stale_after,
        )
        .order_by(DeadLetter.id),
        policy.batch_size,
    )
    return len(
        transition_batch(
            session,
            "dead_letters",
            stale,
            "RETRYING",
            "MANUAL_REVIEW",
            actor=actor,
            reason=f"the replay reported no outcome within {policy.stale_after}",
            now=now,
        )
    )


def triage_batch(
    session: Session, now: datetime, policy: TriagePolicy, actor: str, counts: TriageCounts
) -> int:
    rows = session.execute(
        claim(
            select(
                DeadLetter.id,
                DeadLetter.task_name,
                DeadLetter.error_type,
                DeadLetter.error_message,
                DeadLetter.classification,
                DeadLetter.created_at,
                DeadLetter.replays,
            )
            .where(DeadLetter.status == "NEW")
            .order_by(DeadLetter.id),
            policy.batch_size,
        )
    ).all()
    if not rows:
        return 0
    # (to status, rule, reason) -> ids; replays by task, for their prechecks.
    decided: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    replays: dict[str, list[tuple[Any, str]]] = defaultdict(list)  # (row, the rule's name)
    resolutions: dict[int, str] = {}  # what each precheck said, letter by letter
    for row in rows:
        rule = match(row, policy.rules)
        if rule.action == "discard":
            decided[("DISCARDED", rule.name, rule.reason)].append(row.id)
        elif rule.action == "manual":
            decided[("MANUAL_REVIEW", rule.name, rule.reason)].append(row.id)
        elif now - row.created_at > policy.manual_after:
            reason = f"too old to replay automatically (older than {policy.manual_after})"
            decided[("MANUAL_REVIEW", rule.name, reason)].append(row.id)
        elif row.replays >= policy.replay_budget:
            reason = f"out of automatic replays ({row.replays} of {policy.replay_budget})"
            decided[("MANUAL_REVIEW", rule.name, reason)].append(row.id)
        else:
            replays[row.task_name].append((row, rule.name))

    payloads = dict(
        session.execute(
            select(DeadLetter.id, DeadLetter.payload).where(
                DeadLetter.id.in_([row.id for letters in replays.values() for row, _ in letters])
            )
        ).all()
        if replays
        else []
    )
    for task_name, letters in replays.items():
        answers = run_prechecks(session, task_name, [payloads[row.id] for row, _ in letters], actor)
        for (row, rule_name), unnecessary in zip(letters, answers, strict=True):
            if unnecessary is None:
                decided[("RETRYING", rule_name, "replayed automatically")].append(row.id)
            else:
                counts.unnecessary += 1
                resolutions[row.id] = f"replay unnecessary: {unnecessary}"
                decided[("DISCARDED", "precheck", UNNECESSARY)].append(row.id)

    for (to, rule_name, reason), ids in decided.items():
        assign: dict[str, Any] = {"rule": rule_name}
        if to == "RETRYING":
            assign.update(replays=DeadLetter.replays + 1, last_replayed_at=now)
        elif to == "DISCARDED" and rule_name != "precheck":
            assign["resolution"] = reason
        moved = transition_batch(
            session,
            "dead_letters",
            select(DeadLetter.id).where(DeadLetter.id.in_(ids)),
            "NEW",
            to,
            actor=actor,
            reason=reason,
            now=now,
            values=assign,
        )
        if to == "RETRYING":
            counts.replayed += len(moved)
        elif to == "MANUAL_REVIEW":
            counts.manual_review += len(moved)
        elif rule_name != "precheck":
            counts.discarded += len(moved)
    if resolutions and not is_postgres(session):  # SQLite: no column list on VALUES
        session.execute(
            update(DeadLetter),
            [{"id": key, "resolution": why} for key, why in resolutions.items()],
        )
    elif resolutions:  # one UPDATE ... FROM (VALUES ...), not one statement per letter
        given = values(column("id", DeadLetter.id.type), column("why", Text()), name="given").data(
            list(resolutions.items())
        )
        session.execute(
            update(DeadLetter)
            .where(DeadLetter.id == given.c.id)
            .values(resolution=given.c.why)
            .execution_options(synchronize_session=False)
        )
    # The replays go out through `dlq.dispatch` tasks, a few hundred letters each, so that the
    # workers send them in parallel and a triage of a large backlog is not spent sending.
    replaying = sorted(
        letter_id for (to, _, _), ids in decided.items() if to == "RETRYING" for letter_id in ids
    )
    for start in range(0, len(replaying), DISPATCH_CHUNK):
        chunk = replaying[start : start + DISPATCH_CHUNK]
        enqueue_after_commit(session, "dlq.dispatch", {"dead_letter_ids": chunk})
    return len(rows)


DISPATCH_CHUNK = 500


def dispatch(session: Session, letter_ids: Sequence[int]) -> int:
    """Send the replays of these letters that are still RETRYING (one of them discarded
    meanwhile is not sent). Sent now, on one producer: the letters were committed by triage."""
    rows = session.execute(
        select(DeadLetter.id, DeadLetter.task_name, DeadLetter.payload)
        .where(DeadLetter.id.in_(list(letter_ids)), DeadLetter.status == "RETRYING")
        .order_by(DeadLetter.id)
    ).all()
    with app.producer_or_acquire() as producer:
        for row in rows:
            send(row.task_name, row.payload, headers={HEADER: row.id}, producer=producer)
    return len(rows)


# -- replay and discard, by an operator ---------------------------------------------------------


@dataclass
class Outcome:
    dead_letter_id: int
    outcome: str  # replayed, unnecessary, skipped, invalid, discarded, not_found
    detail: str = ""
    task_name: str = ""
    payload: dict[str, Any] = field(default_factory=dict)
    diff: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ReplayError(PermanentError):
    """A replay cannot be done as asked (an edited payload that fails validation)."""


def payload_diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Field by field: {field: [before, after]}, a missing side as null."""
    return {
        key: [before.get(key), after.get(key)]
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
    }


def validate_for(task_name: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The payload as the task will validate it; a one-line ReplayError naming the field."""
    task = registered_tasks().get(task_name)
    if task is None:
        raise ReplayError(f"task {task_name!r} is not registered: cannot replay it")
    model = getattr(task, "payload_model", None)
    if model is None:
        if payload:
            raise ReplayError(f"{task_name} takes no payload (got fields {sorted(payload)})")
        return payload
    try:
        validate(model, payload)
    except PermanentError as exc:
        raise ReplayError(f"{task_name}: {exc}") from None
    return payload


def replay(
    session: Session,
    letter_ids: Sequence[int],
    *,
    actor: str,
    reason: str,
    now: datetime,
    edit: dict[str, Any] | None = None,
) -> list[Outcome]:
    """Replay these letters now: each is locked, its task's precheck runs (nothing left to do:
    the letter is closed as unnecessary, not run), and the rest go to RETRYING and are sent
    after commit. `edit` replaces the payload (of a single letter), validated against the
    task's schema, with the diff recorded. Letters already REPLAYED or DISCARDED, or with a
    replay in flight, are skipped. For a dry run, roll the session back instead of
    committing: nothing is sent then."""
    if edit is not None and len(letter_ids) != 1:
        raise ReplayError("--edit replays exactly one dead letter")
    letters = {
        letter.id: letter
        for letter in session.scalars(
            select(DeadLetter)
            .where(DeadLetter.id.in_(sorted(set(letter_ids))))
            .order_by(DeadLetter.id)
            .with_for_update()
        )
    }
    replayable = [
        letter for letter in letters.values() if letter.status in ("NEW", "MANUAL_REVIEW")
    ]
    payloads = {letter.id: letter.payload for letter in replayable}
    if edit is not None and replayable:
        payloads[replayable[0].id] = validate_for(replayable[0].task_name, edit)
    # The prechecks, one call per task for the whole selection (`--all` replays thousands).
    answers: dict[int, str | None] = {}
    for task_name in {letter.task_name for letter in replayable}:
        group = [letter.id for letter in replayable if letter.task_name == task_name]
        found = run_prechecks(session, task_name, [payloads[i] for i in group], actor)
        answers.update(zip(group, found, strict=True))
    outcomes = []
    for letter_id in letter_ids:
        letter = letters.get(letter_id)
        if letter is None:
            outcomes.append(
                Outcome(letter_id, "not_found", f"dead letter {letter_id} does not exist")
            )
            continue
        outcome = Outcome(letter_id, "", task_name=letter.task_name, payload=letter.payload)
        outcomes.append(outcome)
        if letter_id not in payloads:
            outcome.outcome, outcome.detail = "skipped", f"it is {letter.status}"
            continue
        payload = payloads[letter_id]
        if edit is not None:
            outcome.diff, outcome.payload = payload_diff(letter.payload, payload), payload
        unnecessary = answers[letter_id]
        if unnecessary is not None:
            outcome.outcome, outcome.detail = "unnecessary", unnecessary
            transition(
                session,
                "dead_letters",
                letter_id,
                "DISCARDED",
                actor=actor,
                reason=f"replay unnecessary: {unnecessary} ({reason})",
                now=now,
                values={"resolution": f"replay unnecessary: {unnecessary}"},
            )
            add_events(
                session,
                [event(letter_id, "replay_unnecessary", actor, reason, now, why=unnecessary)],
            )
            continue
        transition(
            session,
            "dead_letters",
            letter_id,
            "RETRYING",
            actor=actor,
            reason=reason,
            now=now,
            values={
                "payload": payload,
                "replays": DeadLetter.replays + 1,
                "last_replayed_at": now,
                "rule": "manual",
            },
        )
        detail: dict[str, Any] = {"diff": outcome.diff} if outcome.diff else {}
        add_events(session, [event(letter_id, "replayed", actor, reason, now, **detail)])
        send_replay(session, letter_id, letter.task_name, payload)
        outcome.outcome = "replayed"
    return outcomes


def discard(
    session: Session, letter_ids: Sequence[int], *, actor: str, reason: str, now: datetime
) -> list[Outcome]:
    """Close these open letters for good, with the reason."""
    if not reason.strip():
        raise ReplayError("a discard needs a reason")
    outcomes = []
    found = dict(
        session.execute(
            select(DeadLetter.id, DeadLetter.status)
            .where(DeadLetter.id.in_(sorted(set(letter_ids))))
            .order_by(DeadLetter.id)
            .with_for_update()
        ).all()
    )
    for letter_id in letter_ids:
        status = found.get(letter_id)
        if status is None:
            outcomes.append(
                Outcome(letter_id, "not_found", f"dead letter {letter_id} does not exist")
            )
        elif status not in OPEN:
            outcomes.append(Outcome(letter_id, "skipped", f"it is {status}"))
        else:
            transition(
                session,
                "dead_letters",
                letter_id,
                "DISCARDED",
                actor=actor,
                reason=reason,
                now=now,
                values={"resolution": reason, "rule": "manual"},
            )
            add_events(session, [event(letter_id, "discarded", actor, reason, now)])
            outcomes.append(Outcome(letter_id, "discarded"))
    return outcomes
