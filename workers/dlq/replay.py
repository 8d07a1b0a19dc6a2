"""The dead-letter queue, the operators' side: replay and discard (one letter or many), the
tasks' replay prechecks. Letters are written by `workers/dead_letters.py`; triage is
`workers/dlq/triage.py`.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from workers.application import registered_tasks
from workers.db import transition
from workers.dead_letters import (
    HEADER,
    add_events,
    event,
)
from workers.errors import PermanentError
from workers.messaging.enqueue import enqueue_after_commit
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
    answers = precheck_letters(session, replayable, payloads, actor)
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
            close_unnecessary(session, letter_id, unnecessary, actor=actor, reason=reason, now=now)
            continue
        start_replay(session, letter, payload, outcome, actor=actor, reason=reason, now=now)
    return outcomes


def precheck_letters(
    session: Session, letters: Sequence[DeadLetter], payloads: dict[int, Any], actor: str
) -> dict[int, str | None]:
    """The prechecks, one call per task for the whole selection (`--all` replays thousands)."""
    answers: dict[int, str | None] = {}
    for task_name in {letter.task_name for letter in letters}:
        group = [letter.id for letter in letters if letter.task_name == task_name]
        found = run_prechecks(session, task_name, [payloads[i] for i in group], actor)
        answers.update(zip(group, found, strict=True))
    return answers


def close_unnecessary(
    session: Session, letter_id: int, unnecessary: str, *, actor: str, reason: str, now: datetime
) -> None:
    """The precheck found nothing left to do: the letter is closed, not run."""
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


def start_replay(
    session: Session,
    letter: DeadLetter,
    payload: dict[str, Any],
    outcome: Outcome,
    *,
    actor: str,
    reason: str,
    now: datetime,
) -> None:
    """RETRYING, audited, and the task sent with the letter's id once the session commits."""
    transition(
        session,
        "dead_letters",
        letter.id,
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
    add_events(session, [event(letter.id, "replayed", actor, reason, now, **detail)])
    send_replay(session, letter.id, letter.task_name, payload)
    outcome.outcome = "replayed"


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
