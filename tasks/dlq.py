"""Dead-letter tasks: the 15-minute triage, and `dlq.replay` (an operator's replay, reachable
from Flower's task API)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from config import get_settings
from workers.base import TaskContext, task
from workers.dlq.replay import ReplayError, replay
from workers.dlq.triage import TriagePolicy, dispatch, triage
from workers.payloads import DispatchReplays, ReplayDeadLetter


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


@task("dlq.dispatch", payload=DispatchReplays)
def dispatch_replays(ctx: TaskContext, payload: DispatchReplays) -> int:
    """Send the replays triage decided on (a few hundred letters per task)."""
    return dispatch(ctx.session, payload.dead_letter_ids)
