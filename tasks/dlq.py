"""Dead-letter tasks: the 15-minute triage, `dlq.replay` (an operator's replay, reachable
from Flower's task API), `dlq.bulk` (the console's replay or discard of everything a filter
selects) and `dlq.dispatch` (sending the replays a batch decided on)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from config import get_settings
from workers.base import TaskContext, task
from workers.dlq.browse import Filters
from workers.dlq.bulk import Selection, act_on_selection, dispatch
from workers.dlq.replay import ReplayError, replay
from workers.dlq.triage import TriagePolicy, triage
from workers.payloads import BulkDeadLetters, DispatchReplays, ReplayDeadLetter


def triage_policy() -> TriagePolicy:
    settings = get_settings()
    return TriagePolicy(
        manual_after=timedelta(seconds=settings.DLQ_MANUAL_AFTER_SECONDS),
        replay_budget=settings.DLQ_REPLAY_BUDGET,
        stale_after=timedelta(seconds=settings.DLQ_REPLAY_STALE_SECONDS),
        batch_size=settings.DLQ_TRIAGE_BATCH,
    )


@task("dlq.triage")
def run_triage(ctx: TaskContext) -> dict[str, Any]:
    return ctx.in_slot(
        lambda: triage(ctx.steps, ctx.now, triage_policy()).as_dict(),
    )


@task("dlq.replay", payload=ReplayDeadLetter)
def replay_one(ctx: TaskContext, payload: ReplayDeadLetter) -> dict[str, Any]:
    [outcome] = replay(
        ctx.session,
        [payload.dead_letter_id],
        actor=payload.actor,
        reason=payload.reason,
        now=ctx.now,
    )
    if outcome.outcome == "not_found":
        raise ReplayError(outcome.detail)
    return {"outcome": outcome.outcome, "detail": outcome.detail}


def selection_of(payload: BulkDeadLetters) -> Selection:
    def seconds(value: int | None) -> timedelta | None:
        return None if value is None else timedelta(seconds=value)

    return Selection(
        Filters(
            task=payload.task,
            statuses=tuple(payload.statuses),
            error=payload.error,
            classification=payload.classification,
            rule=payload.rule,
            older_than=seconds(payload.older_than_seconds),
            newer_than=seconds(payload.newer_than_seconds),
        ),
        now=datetime.fromtimestamp(payload.as_of_ms / 1000, UTC),
        up_to=payload.up_to_id,
    )


@task("dlq.bulk", payload=BulkDeadLetters)
def act_in_bulk(ctx: TaskContext, payload: BulkDeadLetters) -> dict[str, int]:
    """Every open letter the operator's filter selected, replayed or discarded in committed
    batches (a redelivery takes only what is still open)."""
    return act_on_selection(
        ctx.steps,
        selection_of(payload),
        payload.action,
        actor=payload.actor,
        reason=payload.reason,
        now=ctx.now,
    ).as_dict()


@task("dlq.dispatch", payload=DispatchReplays)
def dispatch_replays(ctx: TaskContext, payload: DispatchReplays) -> int:
    """Send the replays triage decided on (a few hundred letters per task)."""
    return dispatch(ctx.session, payload.dead_letter_ids)
