"""Notifications on real parts: Postgres, the Redis broker, an SMTP server (aiosmtpd) and the
local SMS/push provider over HTTP. The clock is injected: retries are scheduled, not slept."""

from __future__ import annotations

import base64
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import kombu.exceptions
import pytest
from sqlalchemy import Engine, func, insert, select, update

from config.settings import load_settings
from workers.db import Steps, new_session, session_scope
from workers.models import (
    DeadLetter,
    Notification,
    NotificationAttempt,
    PushToken,
    StateTransition,
)
from workers.notify.channels import Channels, EmailChannel, PushChannel, SmsChannel
from workers.notify.delivery import (
    Outcome,
    Policy,
    claim_deliveries,
    deliver_due,
    deliver_notification,
    policy_from,
    replay_deliveries,
    replay_sends,
    send_notification,
    send_notifications,
    sweep_outbox,
)
from workers.payloads import SendNotification, validate

# Ahead of the database's clock: rows written with plain SQL (server-side now()) are due.
T0 = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
POLICY = Policy(
    max_attempts=3, backoff=60, max_delay=900, timeout=1.0, ops_email="oncall@example.com"
)
MESSAGE = {"subject": "Court 3", "body": "See you at 18:00"}


class Clock:
    def __init__(self, at: datetime = T0) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


@pytest.fixture
def channels(smtp: Any, sandbox_server: Any, sandbox: Any) -> Iterator[Channels]:
    made = make_channels(smtp, sandbox_server)
    yield made
    made.close()


def make_channels(smtp: Any, sandbox_server: Any) -> Channels:
    key = sandbox_server.state.api_key
    return Channels(
        email=EmailChannel(
            "127.0.0.1", smtp.port, sender="bookings@example.com", starttls=False, timeout=2
        ),
        sms=SmsChannel(sandbox_server.url, key, timeout=2),
        push=PushChannel(sandbox_server.url, key, timeout=2),
    )


def send(
    channel: str,
    recipient: str,
    *,
    template: str = "message",
    data: dict[str, Any] | None = None,
    dedupe_key: str | None = None,
    at: datetime = T0,
) -> int:
    """notifications.send's function, its payload through JSON as a task's would be."""
    payload = {"channel": channel, "recipient": recipient, "template": template}
    payload["data"] = MESSAGE if data is None and template == "message" else (data or {})
    if dedupe_key:
        payload["dedupe_key"] = dedupe_key
    model = validate(SendNotification, json.loads(json.dumps(payload)))
    with session_scope() as session:
        return send_notification(session, model, at)


def deliver(
    notification_id: int, channels: Channels, clock: Callable[[], datetime], **kw: Any
) -> Outcome:
    with session_scope() as session:
        return deliver_notification(
            Steps(session), notification_id, clock, channels, kw.pop("policy", POLICY), **kw
        )


def row(notification_id: int) -> Notification:
    with session_scope() as session:
        return session.get(Notification, notification_id)


def attempts(notification_id: int) -> list[tuple[int, str, str | None]]:
    with session_scope() as session:
        return [
            (r.attempt, r.outcome, r.error)
            for r in session.scalars(
                select(NotificationAttempt)
                .where(NotificationAttempt.notification_id == notification_id)
                .order_by(NotificationAttempt.id)
            )
        ]


def letters() -> list[DeadLetter]:
    with session_scope() as session:
        return list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))


def queued(redis: Any, queue: str = "notifications") -> list[tuple[str, dict[str, Any]]]:
    """The task messages waiting on a queue in Redis: (task name, kwargs), sorted."""
    found = []
    for key in redis.keys(f"{queue}*"):
        if redis.type(key) != b"list":
            continue
        for raw in redis.lrange(key, 0, -1):
            message = json.loads(raw)
            _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
            found.append((message["headers"]["task"], kwargs))
    return sorted(found, key=json.dumps)


def add_token(token: str, user_id: str) -> None:
    with session_scope() as session:
        session.execute(insert(PushToken).values(token=token, user_id=user_id))


# -- persisting ---------------------------------------------------------------------------------


def test_send_persists_once_per_dedupe_key_and_enqueues_one_delivery(
    committed: Engine, redis: Any
) -> None:
    first = send("email", "ana@example.com", dedupe_key="booking-7-confirmed")
    again = send("email", "ana@example.com", dedupe_key="booking-7-confirmed")
    other = send("sms", "+14155550123")
    assert first == again != other
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Notification)) == 2
    # One delivery pump for all three: the sends within its debounce ride on it.
    assert queued(redis) == [("notifications.deliver_due", {})]
    stored = row(first)
    assert (stored.status, stored.attempts, stored.enqueued_at) == ("PENDING", 0, T0)


def test_concurrent_sends_of_one_dedupe_key_write_one_row(committed: Engine, redis: Any) -> None:
    ids: list[int] = []
    barrier = threading.Barrier(6)

    def one() -> None:
        barrier.wait()
        ids.append(send("push", "user:9", dedupe_key="hold-expired:99"))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1 and len(ids) == 6
    assert queued(redis) == [("notifications.deliver_due", {})]


def payload(recipient: str, **extra: Any) -> SendNotification:
    return validate(
        SendNotification,
        {"channel": "email", "recipient": recipient, "template": "message", "data": MESSAGE}
        | extra,
    )


def send_batch(payloads: list[SendNotification]) -> list[int]:
    with session_scope() as session:
        return send_notifications(session, payloads, T0)


def test_a_batch_of_sends_writes_what_one_by_one_would_in_the_payloads_order(
    committed: Engine, redis: Any
) -> None:
    before = send("email", "old@example.com", dedupe_key="seen-before")
    batch = [
        payload("a@example.com"),
        payload("b@example.com", dedupe_key="k1"),
        payload("c@example.com"),
        payload("d@example.com", dedupe_key="seen-before"),
        payload("e@example.com", dedupe_key="k1"),  # twice in the batch: written once
        payload("f@example.com", dedupe_key="k2"),
        payload("g@example.com"),
    ]
    ids = send_batch(batch)
    with session_scope() as session:
        stored = {n.id: n for n in session.scalars(select(Notification))}
    assert len(stored) == 1 + 5
    assert [stored[i].recipient for i in ids] == [
        "a@example.com",
        "b@example.com",
        "c@example.com",
        "old@example.com",
        "b@example.com",
        "f@example.com",
        "g@example.com",
    ]
    assert ids[3] == before and ids[1] == ids[4]
    assert all(
        (n.status, n.attempts, n.next_attempt_at, n.enqueued_at) == ("PENDING", 0, T0, T0)
        for i, n in stored.items()
        if i != before
    )
    # One pump for the whole batch; a batch of nothing new asks for none.
    assert queued(redis) == [("notifications.deliver_due", {})]
    redis.flushdb()
    assert send_batch([payload("x@example.com", dedupe_key="k2")]) == [ids[5]]
    assert queued(redis) == []


def test_concurrent_batches_with_the_same_keys_write_each_key_once(
    committed: Engine, redis: Any
) -> None:
    keys = [f"hold-expired:{i}" for i in range(500)]
    results: list[list[int]] = []
    barrier = threading.Barrier(4)

    def one(seed: int) -> None:
        order = random.Random(seed).sample(keys, len(keys))  # each in its own order
        batch = [payload(f"guest{keys.index(key)}@example.com", dedupe_key=key) for key in order]
        barrier.wait()
        ids = send_batch(batch)
        results.append([ids[order.index(key)] for key in keys])

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(ids == results[0] for ids in results)
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Notification)) == 500


# -- delivery per channel -----------------------------------------------------------------------


def test_email_is_delivered_over_smtp_and_the_attempt_recorded(
    committed: Engine, channels: Channels, smtp: Any
) -> None:
    notification = send(
        "email",
        "ana@example.com",
        template="booking_confirmed",
        data={"resource_id": "court-3", "start_time": "2026-06-02T18:00Z"},
    )
    outcome = deliver(notification, channels, Clock())
    assert (outcome.result, outcome.attempt) == ("sent", 1)
    [mail] = smtp.messages
    assert mail["To"] == "ana@example.com" and mail["From"] == "bookings@example.com"
    assert mail["Subject"] == "Booking confirmed"
    assert mail["Message-ID"] == f"<backstop-notification-{notification}@example.com>"
    assert "court-3 from 2026-06-02T18:00Z is confirmed" in mail.get_payload()
    stored = row(notification)
    assert (stored.status, stored.sent_at, stored.attempts, stored.in_flight_until) == (
        "SENT",
        T0,
        1,
        None,
    )
    assert attempts(notification) == [(1, "SENT", None)]
    with session_scope() as session:
        audit = session.execute(
            select(
                StateTransition.from_status, StateTransition.to_status, StateTransition.actor
            ).where(StateTransition.entity == "notifications")
        ).all()
    assert audit == [("PENDING", "SENT", "notifications.deliver")]


def test_one_smtp_connection_serves_many_messages(
    committed: Engine, channels: Channels, smtp: Any
) -> None:
    ids = [send("email", f"guest{i}@example.com") for i in range(5)]
    for notification in ids:
        assert deliver(notification, channels, Clock()).result == "sent"
    assert len(smtp.messages) == 5 and smtp.handler.connections == 1


def test_sms_and_push_are_delivered_to_their_providers(
    committed: Engine, channels: Channels, sandbox: Any
) -> None:
    sms = send("sms", "+14155550123")
    push = send("push", "fcm-token-aaaaaaaa")
    add_token("device-one-1111", "42")
    add_token("device-two-2222", "42")
    add_token("device-other-333", "43")
    to_user = send(
        "push",
        "user:42",
        template="hold_expired",
        data={"hold_id": 5, "resource_id": "court-1", "start_time": "18:00"},
    )
    for notification in (sms, push, to_user):
        assert deliver(notification, channels, Clock()).result == "sent"
    [text] = sandbox.messages("sms")
    assert text["to"] == "+14155550123" and text["body"] == "Court 3: See you at 18:00"
    assert text["key"] == f"backstop-notification-{sms}"
    pushed = {m["token"]: m for m in sandbox.messages("push")}
    assert set(pushed) == {"fcm-token-aaaaaaaa", "device-one-1111", "device-two-2222"}
    assert pushed["device-one-1111"]["title"] == "Your hold has expired"
    assert pushed["device-one-1111"]["data"] == {
        "notification_id": str(to_user),
        "template": "hold_expired",
    }


# -- retries ------------------------------------------------------------------------------------


def test_transient_failures_back_off_exponentially_then_end_dead_with_a_dead_letter(
    committed: Engine, channels: Channels, smtp: Any, redis: Any
) -> None:
    smtp.handler.refuse["ana@example.com"] = "451 4.3.0 mailbox busy, try later"
    notification = send("email", "ana@example.com")
    redis.flushdb()
    clock = Clock()
    delays = []
    for attempt in (1, 2):
        outcome = deliver(notification, channels, clock)
        assert (outcome.result, outcome.attempt) == ("retry", attempt)
        assert "451" in (outcome.error or "")
        delays.append(outcome.retry_in)
        stored = row(notification)
        assert stored.status == "PENDING" and stored.in_flight_until is None
        assert stored.next_attempt_at == clock() + timedelta(seconds=outcome.retry_in)
        # A delivery message arriving before the next attempt is due (a duplicate, the sweep)
        # neither sends nor spends an attempt.
        assert deliver(notification, channels, clock).result == "not_due"
        clock.advance(outcome.retry_in)
    # Equal jitter around 60 s, then around 120 s: each within [step/2, step].
    assert 30 <= delays[0] <= 60 and 60 <= delays[1] <= 120
    assert queued(redis) == [("notifications.deliver", {"notification_id": notification})] * 2
    outcome = deliver(notification, channels, clock)
    assert (outcome.result, outcome.attempt) == ("dead", 3)
    assert [(a, o) for a, o, _ in attempts(notification)] == [
        (1, "TRANSIENT"),
        (2, "TRANSIENT"),
        (3, "TRANSIENT"),
    ]
    assert row(notification).status == "DEAD" and smtp.messages == []
    [letter] = letters()
    assert (letter.task_name, letter.payload, letter.classification, letter.attempts) == (
        "notifications.deliver",
        {"notification_id": notification},
        "TRANSIENT",
        3,
    )
    assert letter.error_type == "DeliveryTransient" and "451" in letter.error_message


def test_backoff_is_capped_below_the_broker_visibility_timeout() -> None:
    policy = Policy(max_attempts=30, backoff=60, max_delay=900, timeout=10)
    rng = random.Random(7)
    assert max(policy.delay(n, rng) for n in range(1, 30)) <= 900
    # The policy the task runs with, from the settings: below the visibility timeout they set.
    settings = load_settings(
        BROKER_VISIBILITY_TIMEOUT_SECONDS=1200,
        TASK_SOFT_TIME_LIMIT_SECONDS=500,
        TASK_TIME_LIMIT_SECONDS=550,
    )
    configured = policy_from(settings)
    delays = [configured.delay(n, rng) for n in range(1, configured.max_attempts + 30)]
    assert max(delays) < settings.BROKER_VISIBILITY_TIMEOUT_SECONDS


@pytest.mark.parametrize("fault", ["503", "429", "timeout"])
def test_a_transient_provider_failure_is_retried_and_sent_once(
    committed: Engine, smtp: Any, sandbox_server: Any, sandbox: Any, fault: str
) -> None:
    channels = make_channels(smtp, sandbox_server)
    channels.sms.timeout = 0.5
    sandbox.add_fault("sms", fault, remaining=1, hang_seconds=1.0)
    notification = send("sms", "+14155550123")
    clock = Clock()
    first = deliver(notification, channels, clock)
    assert first.result == "retry"
    clock.advance(first.retry_in or 0)
    assert deliver(notification, channels, clock).result == "sent"
    assert [o for _, o, _ in attempts(notification)] == ["TRANSIENT", "SENT"]
    assert len(sandbox.messages("sms")) == 1
    channels.close()


# -- permanent failures -------------------------------------------------------------------------


def plain_insert(**values: Any) -> int:
    """A notification row as another service (or an alert) writes it, with plain SQL."""
    with session_scope() as session:
        return int(
            session.execute(
                insert(Notification).values(**values).returning(Notification.id)
            ).scalar_one()
        )


@pytest.mark.parametrize(
    ("case", "error_type", "message"),
    [
        ("smtp_550", "RecipientRejected", "SMTP 550"),
        ("http_400", "DeliveryPermanent", "sms provider HTTP 400"),
        ("unknown_template", "TemplateError", "unknown template 'nope'"),
        ("missing_field", "TemplateError", "needs data field 'body'"),
        ("ops_unset", "ChannelNotConfigured", "NOTIFY_OPS_EMAIL is not set"),
    ],
)
def test_a_permanent_failure_ends_dead_at_once(
    committed: Engine,
    channels: Channels,
    smtp: Any,
    sandbox: Any,
    case: str,
    error_type: str,
    message: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = POLICY
    if case == "smtp_550":
        smtp.handler.refuse["gone@example.com"] = "550 5.1.1 <gone@example.com>: no such user"
        notification = send("email", "gone@example.com")
    elif case == "http_400":
        sandbox.add_fault("sms", "400")
        notification = send("sms", "+14155550123")
    elif case == "unknown_template":
        notification = plain_insert(channel="sms", recipient="+14155550123", template="nope")
    elif case == "missing_field":
        notification = plain_insert(
            channel="sms", recipient="+1415555", template="message", data={"subject": "x"}
        )
    else:
        policy = Policy(max_attempts=3, backoff=60, max_delay=900, timeout=1.0)
        notification = plain_insert(
            channel="email", recipient="ops", template="alert.x", data={"message": "m"}
        )
    outcome = deliver(notification, channels, Clock(), policy=policy)
    assert (outcome.result, outcome.attempt) == ("dead", 1)
    assert row(notification).status == "DEAD"
    [letter] = letters()
    assert (letter.classification, letter.error_type, letter.attempts) == (
        "PERMANENT",
        error_type,
        1,
    )
    assert message in letter.error_message
    assert attempts(notification)[0][1] == "PERMANENT"
    assert smtp.messages == [] and sandbox.messages() == []
    # The logs show the error with the recipient masked, even where the server repeated it.
    logged = [vars(record) for record in caplog.records if record.name == "backstop.notify"]
    assert any(entry["msg"] == "notification.dead" for entry in logged)
    assert "gone@example.com" not in repr(logged)


def test_an_unregistered_token_is_invalidated_and_never_used_again(
    committed: Engine, channels: Channels, sandbox: Any
) -> None:
    sandbox.unregister("stale-token-0001", "stale-token-0002")
    notification = send("push", "stale-token-0001")
    assert deliver(notification, channels, Clock()).result == "dead"
    [letter] = letters()
    assert (letter.error_type, letter.classification) == ("TokenUnregistered", "PERMANENT")
    with session_scope() as session:
        token = session.scalar(select(PushToken).where(PushToken.token == "stale-token-0001"))
        assert token.invalidated_at == T0 and "unregistered" in token.invalid_reason
    requests = sandbox.stats()["requests"]["push"]

    # Later sends to it go DEAD at once, without asking the provider.
    again = send("push", "stale-token-0001")
    assert deliver(again, channels, Clock()).result == "dead"
    assert sandbox.stats()["requests"]["push"] == requests
    assert letters()[-1].error_type == "NoPushToken"

    # A user with one good and one stale device: delivered to the good one, the stale one
    # invalidated, and only the good one asked next time.
    add_token("good-token-0001", "7")
    add_token("stale-token-0002", "7")
    to_user = send("push", "user:7")
    assert deliver(to_user, channels, Clock()).result == "sent"
    assert "unregistered" in (attempts(to_user)[-1][2] or "")
    before = sandbox.stats()["requests"]["push"]
    assert deliver(send("push", "user:7"), channels, Clock()).result == "sent"
    assert sandbox.stats()["requests"]["push"] == before + 1
    with session_scope() as session:
        valid = session.scalars(
            select(PushToken.token).where(
                PushToken.user_id == "7", PushToken.invalidated_at.is_(None)
            )
        ).all()
    assert valid == ["good-token-0001"]

    # Once a user has no valid device left, the notification is dead without a call.
    add_token("stale-token-0003", "8")
    sandbox.unregister("stale-token-0003")
    assert deliver(send("push", "user:8"), channels, Clock()).result == "dead"
    assert deliver(send("push", "user:8"), channels, Clock()).result == "dead"
    assert letters()[-1].error_message == "user:8 has no valid push token"


# -- at most one send per notification ----------------------------------------------------------


def test_a_sent_notification_is_never_sent_again(
    committed: Engine, channels: Channels, sandbox: Any
) -> None:
    notification = send("sms", "+14155550123")
    assert deliver(notification, channels, Clock()).result == "sent"
    for _ in range(3):  # redelivered messages, duplicate tasks
        assert deliver(notification, channels, Clock()).result == "already_sent"
    assert sandbox.stats()["requests"] == {"sms": 1}


def test_a_notification_in_flight_elsewhere_is_left_to_that_worker(
    committed: Engine, channels: Channels, sandbox: Any
) -> None:
    notification = send("sms", "+14155550123")
    with session_scope() as session:
        session.execute(
            update(Notification)
            .where(Notification.id == notification)
            .values(in_flight_until=T0 + timedelta(seconds=10))
        )
    assert deliver(notification, channels, Clock()).result == "in_flight"
    # Its lease ran out (that worker died): the next delivery takes it on.
    assert deliver(notification, channels, Clock(T0 + timedelta(seconds=11))).result == "sent"
    assert sandbox.stats()["requests"] == {"sms": 1}


def test_a_batch_leases_its_rows_for_the_calls_it_will_make_not_for_a_full_batch(
    committed: Engine, channels: Channels
) -> None:
    """A pump claims up to 50 rows; finding 3, it must not hold them as long as 50 calls
    could take: if its worker dies, the outbox sweep takes them on after 3 calls' worth."""
    from workers.notify.delivery import claim_deliveries

    ids = [send("sms", f"+1415555000{i}") for i in range(3)]
    with session_scope() as session:
        claimed = claim_deliveries(session, T0, POLICY, limit=50)
    assert sorted(one.notification_id for one in claimed) == ids
    assert {row(i).in_flight_until for i in ids} == {T0 + POLICY.lease(3)}
    assert POLICY.lease(3) < POLICY.lease(50) / 5


def test_a_batch_slower_than_its_lease_gives_back_what_it_could_not_send(
    committed: Engine, smtp: Any, sandbox_server: Any
) -> None:
    """An SMTP server slow at every step (each under the timeout, which is per step): a batch
    would outlast its lease, and the outbox sweep would take back rows already sent. The pump
    stops within the lease and gives the rest back, unattempted, due at once."""
    from workers.notify.delivery import deliver_due

    policy = Policy(max_attempts=3, backoff=60, max_delay=900, timeout=0.5)
    ids = [send("email", f"guest{i}@example.com") for i in range(20)]
    smtp.handler.delay = 0.45  # RCPT and DATA: 0.9 s an email, each step under 0.5 s
    channels = make_channels(smtp, sandbox_server)
    started = time.monotonic()
    try:
        with session_scope() as session:
            deliver_due(Steps(session), Clock(), channels, policy, batch_size=20, time_budget=0)
    finally:
        channels.close()
    took = time.monotonic() - started
    rows = [row(i) for i in ids]
    sent = [r for r in rows if r.status == "SENT"]
    given_back = [r for r in rows if r.status == "PENDING"]
    assert sent and given_back and len(sent) + len(given_back) == 20
    assert took < policy.lease(20).total_seconds()
    assert {(r.attempts, r.in_flight_until) for r in given_back} == {(0, None)}
    assert len(smtp.messages) == len(sent)


def test_concurrent_workers_never_send_one_notification_twice(
    committed: Engine, smtp: Any, sandbox_server: Any, sandbox: Any
) -> None:
    sandbox.add_fault("*", "latency", latency_ms=20)
    ids = [send("push", f"device-token-{i:04d}") for i in range(15)]
    ids += [send("sms", f"+1415555{i:04d}") for i in range(15)]
    results: list[str] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        channels = make_channels(smtp, sandbox_server)
        order = list(ids) * 2  # every message delivered twice by every worker
        random.Random(seed).shuffle(order)
        try:
            for notification in order:
                outcome = deliver(notification, channels, Clock())
                with lock:
                    results.append(outcome.result)
        finally:
            channels.close()

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count("sent") == len(ids)
    assert set(results) <= {"sent", "already_sent", "in_flight"}
    # Every request reached the provider once: no second send, even before its dedupe.
    assert sandbox.stats()["requests"] == {"push": 15, "sms": 15}
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(NotificationAttempt)) == len(ids)


# -- the outbox sweep ---------------------------------------------------------------------------


def test_the_outbox_sweep_re_sends_only_lost_deliveries(committed: Engine, redis: Any) -> None:
    now = T0 + timedelta(minutes=30)
    lost = send("sms", "+14155550001")  # enqueued at T0; its message never ran
    recent = send("sms", "+14155550002", at=now - timedelta(seconds=30))
    in_flight = send("sms", "+14155550003")
    waiting = send("sms", "+14155550004")  # a retry scheduled for later
    done = send("sms", "+14155550005")
    by_sql = plain_insert(channel="sms", recipient="+14155550006", template="message", data=MESSAGE)
    with session_scope() as session:
        for notification, values in (
            (in_flight, {"in_flight_until": now + timedelta(seconds=20)}),
            (waiting, {"next_attempt_at": now + timedelta(minutes=2), "enqueued_at": now}),
            (done, {"status": "SENT"}),
        ):
            session.execute(
                update(Notification).where(Notification.id == notification).values(**values)
            )
    redis.flushdb()  # the broker lost every message
    with new_session() as session:
        result = sweep_outbox(Steps(session), lambda: now, after=timedelta(minutes=5))
    assert result.enqueued == 2
    # One pump for the batch, not a message per row: the pump claims every due row.
    assert queued(redis) == [("notifications.deliver_due", {})]
    with new_session() as session:
        claimed = {c.notification_id for c in claim_deliveries(session, now, POLICY, limit=50)}
        session.rollback()
    # (`recent` too: a pump delivers whatever is due; its own message then finds it SENT.)
    assert claimed == {lost, by_sql, recent}
    assert row(lost).enqueued_at == now and row(recent).enqueued_at == now - timedelta(seconds=30)
    with new_session() as session:  # at once again: those were just sent
        assert sweep_outbox(Steps(session), lambda: now, after=timedelta(minutes=5)).enqueued == 0


@pytest.mark.slow
def test_two_sweeps_at_once_send_each_delivery_once(committed: Engine, redis: Any) -> None:
    with session_scope() as session:
        session.execute(
            insert(Notification),
            [
                {
                    "channel": "sms",
                    "recipient": f"+1415{i:07d}",
                    "template": "message",
                    "data": MESSAGE,
                    "enqueued_at": T0,
                    "next_attempt_at": T0,
                }
                for i in range(600)
            ],
        )
    now = T0 + timedelta(hours=1)
    barrier = threading.Barrier(2)
    counts: list[int] = []

    def sweeper() -> None:
        barrier.wait()
        with new_session() as session:
            counts.append(
                sweep_outbox(
                    Steps(session), lambda: now, after=timedelta(minutes=5), batch_size=50
                ).enqueued
            )

    threads = [threading.Thread(target=sweeper) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Each row taken by one sweep (the pumps then claim each once, with SKIP LOCKED and a
    # lease), and the batches' kicks debounced into pumps, not a message per row.
    assert sum(counts) == 600
    with session_scope() as session:
        marked = session.scalars(select(Notification.enqueued_at)).all()
    assert marked == [now] * 600
    pumps = queued(redis)
    assert 1 <= len(pumps) <= 12  # at most one a batch of 50
    assert all(pump == ("notifications.deliver_due", {}) for pump in pumps)


def test_a_kick_whose_pump_could_not_be_sent_leaves_the_next_kick_free(
    committed: Engine, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The debounce key says "a pump is on its way"; when the send fails none is, and a
    later kick within the debounce window must send one instead of riding on nothing."""
    from workers.celery_app import app
    from workers.messaging.outbox import PUMP_KEY, kick

    def broker_down(*args: Any, **kwargs: Any) -> None:
        raise kombu.exceptions.OperationalError("Error 111 connecting to the broker")

    monkeypatch.setattr(app, "send_task", broker_down)
    with pytest.raises(kombu.exceptions.OperationalError):
        kick()
    assert not redis.exists(PUMP_KEY)
    monkeypatch.undo()
    kick()
    assert queued(redis) == [("notifications.deliver_due", {})]


# -- replays, alerts, holds ---------------------------------------------------------------------


def test_the_replay_precheck_skips_sent_and_revives_dead(
    committed: Engine, channels: Channels, sandbox: Any
) -> None:
    sent = send("sms", "+14155550123")
    assert deliver(sent, channels, Clock()).result == "sent"
    sandbox.add_fault("sms", "503")
    dead = send("sms", "+14155550124")
    clock = Clock()
    for _ in range(POLICY.max_attempts):
        outcome = deliver(dead, channels, clock)
        clock.advance(outcome.retry_in or 0)
    assert row(dead).status == "DEAD"
    with session_scope() as session:  # the whole selection at once, as a bulk replay asks
        answers = replay_deliveries(
            session,
            [
                {"notification_id": sent},
                {"notification_id": 10**9},
                {"notification_id": dead},
                {"notification_id": "not a number"},
            ],
            "ops:alice",
        )
    assert answers == ["already sent", "notifications 1000000000 does not exist", None, None]
    revived = row(dead)
    assert (revived.status, revived.attempts, revived.in_flight_until) == ("PENDING", 0, None)
    with session_scope() as session:
        audit = session.execute(
            select(StateTransition.from_status, StateTransition.to_status, StateTransition.actor)
            .where(StateTransition.entity_id == dead)
            .order_by(StateTransition.id)
        ).all()
    assert audit[-1] == ("DEAD", "PENDING", "ops:alice")
    sandbox.clear_faults()
    assert deliver(dead, channels, Clock(revived.next_attempt_at)).result == "sent"
    assert len(sandbox.messages("sms")) == 2
    with session_scope() as session:  # a send whose dedupe key is recorded needs no replay
        key = {"dedupe_key": "k-1", "channel": "sms"}
        assert replay_sends(session, [key, {"channel": "sms"}], "ops:alice") == [None, None]
    recorded = send("sms", "+14155550125", dedupe_key="k-1")
    with session_scope() as session:
        assert replay_sends(session, [key, {"dedupe_key": 5}], "ops:alice") == [
            f"already recorded as notification {recorded}",
            None,
        ]


def test_an_alert_is_delivered_to_the_ops_address(
    committed: Engine, channels: Channels, smtp: Any, redis: Any
) -> None:
    from workers.observability.alerts import raise_alert

    with session_scope() as session:
        assert raise_alert(
            session, "refund_manual_review", "refund 5 needs review", dedupe="r5", now=T0
        )
    assert queued(redis) == [("notifications.deliver_due", {})]
    with new_session() as session:
        assert deliver_due(Steps(session), Clock(), channels, POLICY).sent == 1
    [mail] = smtp.messages
    assert mail["To"] == "oncall@example.com"
    assert mail["Subject"] == "[backstop alert] refund_manual_review"


def test_a_failed_delivery_send_never_rolls_back_the_alerting_transaction(
    committed: Engine, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kombu.exceptions

    from workers.celery_app import app
    from workers.observability.alerts import raise_alert

    def broker_down(*args: Any, **kwargs: Any) -> None:
        raise kombu.exceptions.OperationalError("Error 111 connecting to the broker")

    monkeypatch.setattr(app, "send_task", broker_down)
    with session_scope() as session:
        assert raise_alert(session, "schedule_missed", "x missed", dedupe="x", now=T0)
    with session_scope() as session:
        stored = session.scalar(select(Notification).where(Notification.dedupe_key == "alert:x"))
    # The alert row is there for the outbox sweep, which sends its delivery later.
    assert stored is not None and stored.status == "PENDING"
    monkeypatch.undo()
    with new_session() as session:
        later = T0 + timedelta(minutes=10)
        assert sweep_outbox(Steps(session), lambda: later, after=timedelta(minutes=5)).enqueued == 1


def test_expired_holds_waitlist_notifications_are_sent_for_delivery(
    committed: Engine, redis: Any
) -> None:
    from tests.workers.factories import add_hold
    from workers.holds.expiry import expire_hold, notify_expired

    with session_scope() as session:
        hold = add_hold(session, T0 - timedelta(minutes=1))
    with session_scope() as session:
        expire_hold(session, hold, T0)
    redis.flushdb()
    with session_scope() as session:
        assert notify_expired(session, [hold], T0) == 1
    assert queued(redis) == [("notifications.deliver_due", {})]
    with session_scope() as session:
        note = session.scalar(select(Notification).where(Notification.template == "hold_expired"))
    assert note.enqueued_at == T0


# -- the delivery pump --------------------------------------------------------------------------


def test_the_pump_delivers_every_due_notification_in_batches(
    committed: Engine, channels: Channels, smtp: Any, sandbox: Any
) -> None:
    smtp.handler.refuse["busy@example.com"] = "451 4.3.0 try later"
    smtp.handler.refuse["gone@example.com"] = "550 5.1.1 no such user"
    good = [send("email", f"guest{i}@example.com") for i in range(12)]
    good += [send("sms", f"+1415555{i:04d}") for i in range(6)]
    good += [send("push", f"device-token-{i:04d}") for i in range(3)]
    busy = send("email", "busy@example.com")
    gone = send("email", "gone@example.com")
    later = send("sms", "+14155550999")
    with session_scope() as session:  # a retry not yet due: the pump leaves it
        session.execute(
            update(Notification)
            .where(Notification.id == later)
            .values(next_attempt_at=T0 + timedelta(minutes=5))
        )
    helpers: list[int] = []
    with new_session() as session:
        result = deliver_due(
            Steps(session),
            Clock(),
            channels,
            POLICY,
            batch_size=10,
            helper=lambda: helpers.append(1),
        )
    assert helpers == [1]  # the first batch came back full: one more pump asked for, once
    assert (result.sent, result.retry, result.dead, result.batches, result.more) == (
        21,
        1,
        1,
        3,
        False,
    )
    assert {row(n).status for n in good} == {"SENT"} and row(later).status == "PENDING"
    assert (row(busy).status, row(gone).status) == ("PENDING", "DEAD")
    assert len(smtp.messages) == 12 and len(sandbox.messages()) == 9
    with session_scope() as session:
        audit = session.scalar(
            select(func.count())
            .select_from(StateTransition)
            .where(
                StateTransition.to_status == "SENT",
                StateTransition.actor == "notifications.deliver_due",
            )
        )
    assert audit == 21


def test_pumps_at_once_never_send_one_notification_twice(
    committed: Engine, smtp: Any, sandbox_server: Any, sandbox: Any
) -> None:
    sandbox.add_fault("*", "latency", latency_ms=5)
    ids = [send("sms", f"+1415555{i:04d}") for i in range(80)]
    totals: list[int] = []

    def pump() -> None:
        channels = make_channels(smtp, sandbox_server)
        try:
            with new_session() as session:
                totals.append(
                    deliver_due(Steps(session), Clock(), channels, POLICY, batch_size=7).sent
                )
        finally:
            channels.close()

    threads = [threading.Thread(target=pump) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(totals) == len(ids) and sandbox.stats()["requests"] == {"sms": len(ids)}
    assert {row(n).status for n in ids} == {"SENT"}


def test_sends_ride_on_a_queued_pump_until_it_starts(committed: Engine, redis: Any) -> None:
    from workers.messaging.outbox import pump_started

    send("sms", "+14155550001")
    send("sms", "+14155550002")
    assert queued(redis) == [("notifications.deliver_due", {})]
    pump_started()  # a pump took the key: what is written after it needs a new one
    send("sms", "+14155550003")
    assert queued(redis) == [("notifications.deliver_due", {})] * 2


def test_the_demo_seeds_its_notifications_once(committed: Engine, redis: Any) -> None:
    from workers.devtools.demo import seed, seed_notifications

    with session_scope() as session:
        seed(session, T0, holds=4)
        ids = seed_notifications(session, T0)
    with session_scope() as session:
        assert seed_notifications(session, T0) == []
        users = set(session.scalars(select(PushToken.user_id)))
    assert len(ids) == 3 and {row(n).status for n in ids} == {"PENDING"}
    assert users == {"demo-user-0", "demo-user-1", "demo-user-2", "demo-user-3"}
    assert [kwargs for task, kwargs in queued(redis) if task == "notifications.deliver"] == [
        {"notification_id": n} for n in ids
    ]


def test_odd_rows_written_by_plain_sql_end_dead_without_stopping_the_pump(
    committed: Engine, channels: Channels, smtp: Any
) -> None:
    not_an_object = plain_insert(
        channel="email", recipient="a@example.com", template="message", data=[1, 2]
    )
    injected = plain_insert(
        channel="email",
        recipient="b@example.com",
        template="message",
        data={"subject": "Hi\r\nBcc: victim@example.com", "body": "x"},
    )
    garbage = plain_insert(channel="email", recipient="\u00e4\n@", template="message", data=MESSAGE)
    fine = send("email", "c@example.com")
    with new_session() as session:
        result = deliver_due(Steps(session), Clock(), channels, POLICY)
    assert (result.sent, result.dead) == (2, 2)
    assert row(not_an_object).status == row(garbage).status == "DEAD"
    assert row(injected).status == row(fine).status == "SENT"
    subjects = sorted(mail["Subject"] for mail in smtp.messages)
    assert subjects == ["Court 3", "Hi Bcc: victim@example.com"]
    assert all(
        to == ["b@example.com"] or to == ["c@example.com"] for _, to in smtp.handler.envelopes
    )
    assert "data is a JSON list" in (row(not_an_object).last_error or "")
