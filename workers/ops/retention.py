"""Nightly retention: old rows the sweeps and checks no longer need are deleted in batches, so
the tables the hot paths read stay small.

What goes, past its setting's age: `job_runs` rows (the last run of every job is always far
younger), dead letters that are closed (REPLAYED or DISCARDED; open ones stay whatever their
age) with their events, processed `webhook_events`, and `state_transitions` audit rows. Each
batch is claimed with SKIP LOCKED and committed on its own, so the job never holds a long
transaction and two runs split the work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, delete, select

from workers.db import Steps, claim
from workers.models import DeadLetter, JobRun, StateTransition, WebhookEvent


@dataclass(frozen=True)
class Retention:
    job_runs: timedelta
    dead_letters: timedelta
    webhook_events: timedelta
    audit: timedelta
    batch_size: int = 5000


def targets(policy: Retention, now: datetime) -> dict[str, tuple[Any, ColumnElement[bool]]]:
    """What each prune deletes: its model and the condition on old rows."""
    return {
        "job_runs": (JobRun, JobRun.started_at < now - policy.job_runs),
        "dead_letters": (
            DeadLetter,
            DeadLetter.status.in_(("REPLAYED", "DISCARDED"))
            & (DeadLetter.updated_at < now - policy.dead_letters),
        ),
        "webhook_events": (
            WebhookEvent,
            WebhookEvent.processed_at.isnot(None)
            & (WebhookEvent.received_at < now - policy.webhook_events),
        ),
        "state_transitions": (StateTransition, StateTransition.at < now - policy.audit),
    }


def prune(
    steps: Steps,
    policy: Retention,
    now: datetime,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    """Delete every old row, batch by batch; returns the rows deleted per table."""
    deleted: dict[str, int] = {}
    for name, (model, old) in targets(policy, now).items():
        deleted[name] = 0
        while True:
            batch = claim(select(model.id).where(old).order_by(model.id), policy.batch_size)
            with steps.step(f"prune {name}") as session:
                ids = list(session.scalars(batch))
                if ids:
                    session.execute(
                        delete(model)
                        .where(model.id.in_(ids))
                        .execution_options(synchronize_session=False)
                    )
            deleted[name] += len(ids)
            if progress is not None and ids:
                progress(name, deleted[name])
            if len(ids) < policy.batch_size:
                break
    return deleted
