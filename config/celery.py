"""Celery configuration: JSON only, late acks, the four queues and their routes."""

from __future__ import annotations

import ssl

from kombu import Exchange, Queue

from config.settings import VAR_DIR, Settings

QUEUES = ("critical", "default", "notifications", "batch")


def max_countdown(settings: Settings) -> float:
    """The longest countdown any task may ask for (`Settings.max_countdown`): Redis re-delivers
    an unacked message after the visibility timeout, and a task waiting for its countdown is
    unacked, so every countdown and ETA stays below half of it, and below 15 minutes."""
    return settings.max_countdown


# Routes by task-name prefix; a task may still name its queue explicitly.
ROUTES = {
    "holds.expired": {"queue": "default"},  # the follow-up is not time-critical
    "holds.*": {"queue": "critical"},
    "refunds.*": {"queue": "critical"},
    "webhooks.*": {"queue": "critical"},
    "notifications.*": {"queue": "notifications"},
    "reconciliation.*": {"queue": "batch"},
    "dlq.*": {"queue": "default"},
    "ops.retention": {"queue": "batch"},  # long deletes: never in front of a refund
    "ops.*": {"queue": "default"},
}


def broker_transport_options(settings: Settings) -> dict[str, object]:
    if settings.BROKER_URL == "filesystem://":
        folder = VAR_DIR / "broker"
        for sub in ("messages", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "messages"),
            "data_folder_out": str(folder / "messages"),
            "control_folder": str(folder / "control"),
            "polling_interval": 0.2,
        }
    visibility = settings.BROKER_VISIBILITY_TIMEOUT_SECONDS
    return {
        "visibility_timeout": visibility,
        # kombu looks for messages a killed worker took, and gives them back, only every
        # interval x throttle seconds (100 s by default) once they are past the visibility
        # timeout: scan every interval instead, and never let a dead restorer's lock block
        # the others for longer than the timeout itself.
        "unacked_restore_interval": max(1, min(10, visibility // 8)),
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": min(300, visibility),
    }


def celery_config(settings: Settings) -> dict[str, object]:
    """The Celery configuration mapping for `app.conf.update`."""
    config = _celery_config(settings)
    if settings.BROKER_URL == "filesystem://":
        # kombu's filesystem transport, writing each message whole before it appears.
        config["broker_transport"] = "workers.messaging.embedded_broker:Transport"
    elif settings.broker_is_redis:
        # kombu's Redis transport, surviving the close of a connection Redis dropped.
        config["broker_transport"] = "workers.messaging.redis_transport:Transport"
        if settings.BROKER_URL.startswith("rediss://"):
            # Naming the transport class drops what the scheme implied (TLS, which kombu would
            # even run unverified): TLS with the server's certificate verified.
            config["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return config


def _celery_config(settings: Settings) -> dict[str, object]:
    return {
        "broker_url": settings.BROKER_URL,
        "broker_transport_options": broker_transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A failed task is acked only after `BackstopTask` dead-lettered it (or, at a hard time
        # limit, `TaskRequest.on_timeout` did): nothing that fails is dropped.
        "task_acks_on_failure_or_timeout": True,
        "task_soft_time_limit": settings.TASK_SOFT_TIME_LIMIT_SECONDS,
        "task_time_limit": settings.TASK_TIME_LIMIT_SECONDS,
        # One message at a time per process, so a long task never sits on a hold expiry.
        "worker_prefetch_multiplier": 1,
        "task_queues": [Queue(name, Exchange(name), routing_key=name) for name in QUEUES],
        "task_default_queue": "default",
        "task_default_exchange": "default",
        "task_default_routing_key": "default",
        "task_routes": ROUTES,
        "task_create_missing_queues": False,
        # No task-sent events: each would be a second publish per task; Flower shows tasks
        # from the worker's received/started/succeeded events.
        "task_send_sent_event": False,
        "worker_send_task_events": True,
        "worker_max_tasks_per_child": settings.WORKER_MAX_TASKS_PER_CHILD,
        "worker_max_memory_per_child": settings.WORKER_MAX_MEMORY_PER_CHILD_KB,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        # A broker loss does not stop the tasks running: most need only the database and a
        # gateway or SMTP, and a task stopped half-way leaves its leases to expire and its sent
        # emails unrecorded. They finish, and ack over a new connection
        # (workers/messaging/consumer.py puts back only what had not started); every task is safe
        # to run twice.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # A message no task can run (unknown name, undecodable body) becomes a dead letter.
        "worker_consumer": "workers.messaging.consumer:Consumer",
        # Exactly one beat sends (workers/messaging/beat.py); it renews its lock at least this
        # often.
        "beat_scheduler": "workers.messaging.beat:SingletonScheduler",
        "beat_max_loop_interval": max(1, settings.BEAT_LOCK_SECONDS // 3),
        "timezone": settings.TIMEZONE,
        "enable_utc": True,
        "task_protocol": 2,
    }
