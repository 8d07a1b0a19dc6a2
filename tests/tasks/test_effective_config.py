"""The configuration a running worker really has matches what the settings and the contract
promise. The worker is asked (`inspect backstop_limits`), not the settings: a Celery or kombu
release that changes a default, or a task that sets an option of its own, fails here."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

import pytest

from config.settings import Settings
from tests.processes import Proc
from workers.celery_app import app

pytestmark = pytest.mark.e2e

DEFAULTS = {name: field.default for name, field in Settings.model_fields.items()}

# The contract's queues (section 1): a slow reconciliation never delays a hold or a refund.
CONTRACT_QUEUES = (
    ("holds.expired", "default"),  # the follow-up notification, not time-critical
    ("holds.*", "critical"),
    ("refunds.*", "critical"),
    ("webhooks.*", "critical"),
    ("payments.*", "default"),
    ("notifications.*", "notifications"),
    ("reconciliation.*", "batch"),
    ("ops.retention", "batch"),
    ("ops.*", "default"),
    ("dlq.*", "default"),
)
# Tasks other services send by name (contract section 4) and the scheduled ones (section 5).
CONTRACT_TASKS = {
    "holds.expire",
    "refunds.submit",
    "notifications.send",
    "webhooks.process",
    "dlq.replay",
    "holds.sweep_expired",
    "refunds.retry_stuck",
    "reconciliation.nightly",
    "dlq.triage",
    "ops.check_schedules",
}


def contract_queue(task_name: str) -> str:
    return next(queue for glob, queue in CONTRACT_QUEUES if fnmatch.fnmatchcase(task_name, glob))


def ask_worker(name: str) -> dict[str, Any]:
    replies = app.control.broadcast("backstop_limits", reply=True, timeout=10, destination=[name])
    assert replies, f"{name} did not answer"
    [(_, answer)] = replies[0].items()
    return answer  # type: ignore[no-any-return]


def test_a_running_worker_has_the_limits_the_settings_and_the_contract_promise(
    start_worker: Callable[..., Proc],
) -> None:
    worker = start_worker()
    limits = ask_worker(worker.node)
    celery, tasks = limits["celery"], limits["tasks"]

    # Late acks: a message is acked only after its task ran, and put back if the process
    # running it dies; a failure is acked only once the base task dead-lettered it.
    assert celery["task_acks_late"] is True
    assert celery["task_reject_on_worker_lost"] is True
    assert celery["task_acks_on_failure_or_timeout"] is True
    assert celery["worker_prefetch_multiplier"] == 1  # no task waits behind a long one
    assert (celery["task_serializer"], celery["accept_content"]) == ("json", ["json"])
    soft, hard = celery["task_soft_time_limit"], celery["task_time_limit"]
    assert (soft, hard) == (
        DEFAULTS["TASK_SOFT_TIME_LIMIT_SECONDS"],
        DEFAULTS["TASK_TIME_LIMIT_SECONDS"],
    )

    # Redis hands an unacked message to another worker after the visibility timeout: a
    # message waits out its countdown unacked and then runs, so both must fit inside it.
    visibility = celery["broker_visibility_timeout"]
    assert visibility == DEFAULTS["BROKER_VISIBILITY_TIMEOUT_SECONDS"]
    longest_wait = limits["longest_countdown_seconds"]
    assert limits["longest_retry_countdown_seconds"] <= longest_wait
    assert longest_wait + hard < visibility

    assert set(tasks) >= CONTRACT_TASKS
    for name, options in tasks.items():
        assert options["max_retries"] is None, f"{name}: Celery would cut its retries short"
        assert options["acks_late"] is True, name
        assert options["reject_on_worker_lost"] is True, name
        assert options["acks_on_failure_or_timeout"] is True, name
        assert (options["soft_time_limit"], options["time_limit"]) == (soft, hard), name
        assert options["queue"] == contract_queue(name), name
