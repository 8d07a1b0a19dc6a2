"""Dead-letter triage, every 15 minutes (`dlq.triage`): each NEW letter is sorted by the rules
in `workers/dlq/rules.py` into replayed now (its task's precheck first), discarded, or left for
a person (MANUAL_REVIEW); RETRYING letters whose replay never reported back are given up as
stale. Set-based: batches of letters claimed with SKIP LOCKED, one audited batch transition
each; the replays are sent after commit by `dlq.dispatch`."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from workers.db import Steps, claim, transition_batch
from workers.dead_letters import add_events, event
from workers.dlq.bulk import record_resolutions, send_replays
from workers.dlq.replay import UNNECESSARY, run_prechecks
from workers.dlq.rules import RULES, Rule, match
from workers.models import DeadLetter

log = logging.getLogger("backstop.dlq")


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
    steps: Steps,
    now: datetime,
    policy: TriagePolicy,
    actor: str = "dlq.triage",
) -> TriageCounts:
    """One triage run: re-sort open letters by the rules' classifications, give up on replays
    that never reported back, then decide every NEW letter, batch by batch, each batch claimed
    with SKIP LOCKED and committed (two runs at once split the letters, none is replayed twice).
    Replays are sent after their batch commits."""
    counts = TriageCounts()
    with steps.step("reclassify") as session:
        counts.reclassified = reclassify(session, policy.rules, now)
        counts.stale = give_up_stale(session, now, policy, actor)
    while True:
        with steps.step("batch") as session:
            taken = triage_batch(session, now, policy, actor, counts)
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


# (to status, rule, reason) -> letter ids: one audited batch transition each.
Decisions = dict[tuple[str, str, str], list[int]]


def triage_batch(
    session: Session, now: datetime, policy: TriagePolicy, actor: str, counts: TriageCounts
) -> int:
    """Claim a batch of NEW letters, decide each by the rules (and its task's precheck, for a
    replay), move them in one batch transition per decision, and ask for the replays to be
    sent after commit. Returns how many letters it claimed."""
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
    decided, replays = decide(rows, now, policy)
    resolutions = precheck_replays(session, replays, decided, actor, counts)
    apply_decisions(session, decided, now, actor, counts)
    record_resolutions(session, resolutions)
    return len(rows)


def decide(
    rows: Sequence[Any], now: datetime, policy: TriagePolicy
) -> tuple[Decisions, dict[str, list[tuple[Any, str]]]]:
    """Each letter's rule: discarded, left for a person, or a replay (by task, with the rule's
    name), which its task's precheck has yet to confirm."""
    decided: Decisions = defaultdict(list)
    replays: dict[str, list[tuple[Any, str]]] = defaultdict(list)
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
    return decided, replays


def precheck_replays(
    session: Session,
    replays: dict[str, list[tuple[Any, str]]],
    decided: Decisions,
    actor: str,
    counts: TriageCounts,
) -> dict[int, str]:
    """Run each task's precheck over its letters' payloads at once: a replay it finds
    unnecessary is discarded with what it said (returned, letter by letter), the rest replay."""
    if not replays:
        return {}
    wanted = [row.id for letters in replays.values() for row, _ in letters]
    payloads = dict(
        session.execute(
            select(DeadLetter.id, DeadLetter.payload).where(DeadLetter.id.in_(wanted))
        ).all()
    )
    resolutions: dict[int, str] = {}
    for task_name, letters in replays.items():
        answers = run_prechecks(session, task_name, [payloads[row.id] for row, _ in letters], actor)
        for (row, rule_name), unnecessary in zip(letters, answers, strict=True):
            if unnecessary is None:
                decided[("RETRYING", rule_name, "replayed automatically")].append(row.id)
            else:
                counts.unnecessary += 1
                resolutions[row.id] = f"replay unnecessary: {unnecessary}"
                decided[("DISCARDED", "precheck", UNNECESSARY)].append(row.id)
    return resolutions


# The event each decision leaves on its letters, beside the audited transition.
EVENTS = {"RETRYING": "replayed", "MANUAL_REVIEW": "manual_review", "DISCARDED": "discarded"}


def apply_decisions(
    session: Session, decided: Decisions, now: datetime, actor: str, counts: TriageCounts
) -> None:
    """One audited batch transition per decision, one INSERT of events for the batch (the
    same events an operator's replay or discard leaves), and the replays dispatched."""
    events, replaying = [], []
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
        action = "replay_unnecessary" if rule_name == "precheck" else EVENTS[to]
        events += [event(i, action, actor, reason, now, rule=rule_name) for i in moved]
        if to == "RETRYING":
            counts.replayed += len(moved)
            replaying += moved
        elif to == "MANUAL_REVIEW":
            counts.manual_review += len(moved)
        elif rule_name != "precheck":
            counts.discarded += len(moved)
    add_events(session, events)
    send_replays(session, sorted(replaying))
