"""Notification delivery: persisted once, sent by at most one worker at a time, every attempt
recorded, transient failures retried with backoff and the rest dead-lettered.

A delivery runs in three steps, like a refund's. (1) One UPDATE claims PENDING rows that are
due and that no other worker holds: it counts the attempt and takes a short lease; templates
are rendered and recipients resolved (push: the user's valid device tokens) in the same
transaction, which commits before anything is sent. (2) The providers are called with no
transaction open. (3) The outcomes are written: SENT through the audited transition; a
transient failure with attempts left schedules the next attempt (`next_attempt_at`, and a
`notifications.deliver` message with that countdown); anything else moves the row to DEAD and
writes its dead letter, as a `notifications.deliver` payload an operator can replay.

New notifications are delivered in batches by `notifications.deliver_due` pumps, which every
commit that writes notifications asks for (debounced through Redis, so a burst of sends shares
a few pumps instead of costing a task each). The outbox sweep finds what a lost message left.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import ColumnElement, and_, any_, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from config.celery import max_countdown
from workers.db import Steps, claim, is_postgres, transition, transition_batch, update_each
from workers.db.upsert import insert_ignore
from workers.dead_letters import record_dead_letter
from workers.errors import Classification, NotFound, PermanentError, classify, one_line
from workers.messaging.enqueue import enqueue_after_commit
from workers.messaging.outbox import OPS_RECIPIENT, kick_after_commit
from workers.models import Notification, NotificationAttempt, PushToken
from workers.notify.channels import (
    ChannelNotConfigured,
    Channels,
    DeliveryPermanent,
    DeliveryTransient,
    Message,
    NoPushToken,
    TokenUnregistered,
    mask,
    scrub,
)
from workers.payloads import SendNotification
from workers.retry import backoff_delay
from workers.templates import render

log = logging.getLogger("backstop.notify")

# A delivery message may run this much before the attempt it was scheduled for (clock skew
# between the worker that scheduled it and the one that runs it).
EARLY_TOLERANCE = timedelta(seconds=1)
# A push to `user:<id>` goes to at most this many of the user's newest valid tokens.
MAX_DEVICES = 10

Clock = Callable[[], datetime]


@dataclass(frozen=True)
class Policy:
    """How deliveries are retried. `backoff` is the first delay (it doubles, with jitter, up
    to `max_delay`, which stays below the broker's visibility timeout)."""

    max_attempts: int
    backoff: float
    max_delay: float
    timeout: float  # of one provider call
    ops_email: str | None = None

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        return backoff_delay(attempt - 1, self.backoff, self.max_delay, rng)

    def lease(self, sends: int) -> timedelta:
        # Long enough for every provider call of the attempt, each up to its timeout.
        return timedelta(seconds=self.timeout * (sends + 1) + 5)


def policy_from(settings: Any) -> Policy:
    return Policy(
        max_attempts=settings.NOTIFY_MAX_ATTEMPTS,
        backoff=settings.NOTIFY_BACKOFF_SECONDS,
        max_delay=max_countdown(settings),
        timeout=settings.NOTIFY_TIMEOUT_SECONDS,
        ops_email=settings.NOTIFY_OPS_EMAIL,
    )


# -- persisting -----------------------------------------------------------------------------------


def new_row(payload: SendNotification, now: datetime) -> dict[str, Any]:
    return {
        "channel": payload.channel,
        "recipient": payload.recipient,
        "template": payload.template,
        "data": dict(payload.data),
        "dedupe_key": payload.dedupe_key,
        "created_at": now,
        "updated_at": now,
        "next_attempt_at": now,
        "enqueued_at": now,
    }


def send_notification(session: Session, payload: SendNotification, now: datetime) -> int:
    """`notifications.send`: write the notification once and, after commit, send its delivery.
    A `dedupe_key` seen before returns the notification already written, and sends nothing:
    that one is delivered (or being delivered) already."""
    row = new_row(payload, now)
    if payload.dedupe_key is None:
        notification_id = int(
            session.execute(
                insert(Notification).values(**row).returning(Notification.id)
            ).scalar_one()
        )
    else:
        added = insert_ignore(
            session, Notification, row, conflict=["dedupe_key"], returning=Notification.id
        )
        if not added:
            existing = session.execute(
                select(Notification.id).where(Notification.dedupe_key == payload.dedupe_key)
            ).scalar_one()
            log.info(
                "notification.duplicate",
                extra={"notification_id": existing, "dedupe_key": payload.dedupe_key},
            )
            return int(existing)
        notification_id = int(added[0])
    kick_after_commit(session)
    return notification_id


# The batch's statements, on the table (Core): compiled once and cached, each executed once for
# all its rows (SQLAlchemy's "insertmanyvalues": one INSERT ... VALUES with every row).
_NOTIFICATIONS = Notification.__table__
_INSERT_PLAIN = insert(_NOTIFICATIONS).returning(_NOTIFICATIONS.c.id, sort_by_parameter_order=True)
_INSERT_KEYED = (
    postgresql.insert(_NOTIFICATIONS)
    .on_conflict_do_nothing(index_elements=["dedupe_key"])
    .returning(_NOTIFICATIONS.c.dedupe_key, _NOTIFICATIONS.c.id)
)


def send_notifications(
    session: Session, payloads: Sequence[SendNotification], now: datetime
) -> list[int]:
    """`notifications.send` for many messages in one transaction (the worker receives it in
    batches): the same rows and the same dedupe as one by one, in at most three statements and
    one kick. A dedupe key seen before, or twice in the batch, is written once; each message
    that carries it gets that notification's id. Returns the ids in the payloads' order."""
    if not is_postgres(session):
        return [send_notification(session, payload, now) for payload in payloads]
    ids: list[int | None] = [None] * len(payloads)
    plain = [i for i, payload in enumerate(payloads) if payload.dedupe_key is None]
    keyed: dict[str, list[int]] = defaultdict(list)
    for i, payload in enumerate(payloads):
        if payload.dedupe_key is not None:
            keyed[payload.dedupe_key].append(i)
    if plain:
        written = session.execute(
            _INSERT_PLAIN, [new_row(payloads[i], now) for i in plain]
        ).scalars()
        for i, notification_id in zip(plain, written, strict=True):
            ids[i] = notification_id
    added: dict[str, int] = {}
    if keyed:
        # In the keys' order: two batches that share keys then wait on each other in one
        # order and never deadlock.
        rows = [new_row(payloads[keyed[key][0]], now) for key in sorted(keyed)]
        added = {
            key: notification_id for key, notification_id in session.execute(_INSERT_KEYED, rows)
        }
        seen = [key for key in keyed if key not in added]
        existing = {}
        if seen:
            found = session.execute(
                select(Notification.dedupe_key, Notification.id).where(
                    Notification.dedupe_key.in_(seen)
                )
            )
            existing = {key: notification_id for key, notification_id in found}
        for key, positions in keyed.items():
            notification_id = added.get(key) or existing[key]
            for i in positions:
                ids[i] = notification_id
            if key not in added or len(positions) > 1:
                log.info(
                    "notification.duplicate",
                    extra={
                        "notification_id": notification_id,
                        "dedupe_key": key,
                        "messages": len(positions) - (key in added),
                    },
                )
    if plain or added:
        kick_after_commit(session)
    return [int(notification_id) for notification_id in ids]  # type: ignore[arg-type]


# -- delivering -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one delivery run did. `result`: sent, retry, dead, or why nothing was done:
    already_sent, already_dead, in_flight (another worker holds it), not_due."""

    notification_id: int
    result: str
    attempt: int = 0
    retry_in: float | None = None
    error: str | None = None


@dataclass
class Claimed:
    """Step 1's result for one notification: its messages, or the permanent reason not to
    send any."""

    notification_id: int
    channel: str
    attempt: int
    recipient: str
    messages: list[Message] = field(default_factory=list)
    problem: PermanentError | None = None


@dataclass
class Sent:
    """Step 2's result. For a push to several devices, some may be accepted, some not."""

    refs: list[str] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)
    unregistered: list[TokenUnregistered] = field(default_factory=list)

    def error(self) -> Exception | None:
        """The attempt's error, or None if the provider took the message (to any device)."""
        if self.refs:
            return None
        transient = [e for e in self.errors if isinstance(e, DeliveryTransient)]
        if transient:
            return transient[0]
        return (self.errors or self.unregistered or [None])[0]  # type: ignore[list-item]


def deliver_notification(
    steps: Steps,
    notification_id: int,
    clock: Clock,
    channels: Channels,
    policy: Policy,
    *,
    actor: str = "notifications.deliver",
    task_id: str | None = None,
    rng: random.Random | None = None,
) -> Outcome:
    """`notifications.deliver`: one notification (a retry, a replay, the sweep's re-send):
    claim, send, record, committing between the steps."""
    now = clock()
    with steps.step("claim") as session:
        claimed = claim_deliveries(session, now, policy, ids=[notification_id])
        if not claimed:
            return _not_claimed(session, notification_id, now)
    results = [(one, send_messages(one, channels)) for one in claimed]
    with steps.step("record") as session:
        [outcome] = record_deliveries(
            session, results, clock(), policy, actor=actor, task_id=task_id, rng=rng
        )
    return outcome


@dataclass
class DueResult:
    sent: int = 0
    retry: int = 0
    dead: int = 0
    batches: int = 0
    more: bool = False  # stopped by the time budget with due notifications left

    def as_dict(self) -> dict[str, int]:
        return {"sent": self.sent, "retry": self.retry, "dead": self.dead, "batches": self.batches}


def deliver_due(
    steps: Steps,
    clock: Clock,
    channels: Channels,
    policy: Policy,
    *,
    batch_size: int = 50,
    time_budget: float = 10.0,
    actor: str = "notifications.deliver_due",
    task_id: str | None = None,
    rng: random.Random | None = None,
    helper: Callable[[], object] | None = None,
) -> DueResult:
    """`notifications.deliver_due`: deliver every due notification, a batch at a time. Each
    batch is claimed with SKIP LOCKED in one statement (so pumps running at once split the
    work), sent over the channels' kept connections, and recorded with one statement per kind
    of outcome. Stops at a short batch, or after `time_budget` seconds with `more` set. A
    first batch that comes back full calls `helper` once (a second pump for another worker
    process: a backlog is shared out instead of waiting on one)."""

    result = DueResult()
    deadline = time.monotonic() + time_budget
    while True:
        with steps.step("claim") as session:
            claimed = claim_deliveries(session, clock(), policy, limit=batch_size)
        if helper is not None and result.batches == 0 and len(claimed) == batch_size:
            helper()
        if claimed:
            # The lease covers one timeout per message; a server slow at every step (SMTP's
            # timeout is per step) could outlast it, and the outbox sweep would then take rows
            # back whose messages went out. What cannot be sent within the lease is released.
            ends = (
                time.monotonic()
                + policy.lease(sum(len(c.messages) for c in claimed)).total_seconds()
            )
            results: list[tuple[Claimed, Sent]] = []
            unsent: list[int] = []
            for one in claimed:
                needs = policy.timeout * max(len(one.messages), 1)
                if results and time.monotonic() + needs > ends:
                    unsent.append(one.notification_id)
                else:  # the lease always covers the first
                    results.append((one, send_messages(one, channels)))
            with steps.step("record") as session:
                outcomes = record_deliveries(
                    session, results, clock(), policy, actor=actor, task_id=task_id, rng=rng
                )
                release(session, unsent, clock())
            for outcome in outcomes:
                setattr(result, outcome.result, getattr(result, outcome.result) + 1)
        result.batches += 1
        if len(claimed) < batch_size:
            return result
        if time.monotonic() >= deadline:
            result.more = True
            return result


def _lease_free(now: datetime) -> ColumnElement[bool]:
    return Notification.in_flight_until.is_(None) | (Notification.in_flight_until <= now)


def claim_deliveries(
    session: Session,
    now: datetime,
    policy: Policy,
    *,
    ids: Sequence[int] | None = None,
    limit: int = 1,
) -> list[Claimed]:
    """Step 1: take the notifications `ids`, or up to `limit` due ones, if they are PENDING,
    due and free, in one compare-and-set UPDATE that counts the attempt and takes a lease (a
    second claimer's UPDATE waits for our row locks, then finds the lease taken), and prepare
    their messages. The caller commits before sending."""
    due = (
        Notification.status == "PENDING",
        _lease_free(now),
        Notification.next_attempt_at <= now + EARLY_TOLERANCE,
    )
    if ids is None:
        picked = claim(
            select(Notification.id).where(*due).order_by(Notification.next_attempt_at), limit
        )
        if is_postgres(session):
            chosen = Notification.id == any_(func.array(picked.scalar_subquery()))
        else:
            ids = list(session.execute(picked).scalars())
            if not ids:
                return []
            chosen = Notification.id.in_(ids)
    else:
        chosen = Notification.id.in_(list(ids))
    rows = session.execute(
        update(Notification)
        .where(chosen, *due)
        .values(
            attempts=Notification.attempts + 1,
            in_flight_until=now + policy.lease(1),  # sized below, in the same transaction
            updated_at=now,
        )
        .returning(Notification.id, *CLAIMED_COLUMNS)
    ).all()
    if not rows:
        return []
    claimed = prepare(session, rows, policy)
    # The lease covers the calls this batch will really make, each bounded by the channel's
    # timeout, so it cannot run out while the batch works; a batch cut short (its worker
    # killed) frees its rows for the outbox sweep that soon, not after a full batch's worth.
    sends = sum(len(one.messages) for one in claimed)
    if sends > 1:
        session.execute(
            update(Notification)
            .where(Notification.id.in_([row.id for row in rows]))
            .values(in_flight_until=now + policy.lease(sends))
        )
    return claimed


CLAIMED_COLUMNS = (
    Notification.channel,
    Notification.recipient,
    Notification.template,
    Notification.data,
    Notification.attempts,
)


def prepare(session: Session, rows: Sequence[Any], policy: Policy) -> list[Claimed]:
    """Render each claimed notification and resolve where it goes; the push tokens of all of
    them are read in two statements."""
    push = [row.recipient for row in rows if row.channel == "push"]
    users = {r.removeprefix("user:") for r in push if r.startswith("user:")}
    raw = {r for r in push if not r.startswith("user:")}
    devices: dict[str, list[str]] = defaultdict(list)
    if users:
        for token, user_id in session.execute(
            select(PushToken.token, PushToken.user_id)
            .where(PushToken.user_id.in_(users), PushToken.invalidated_at.is_(None))
            .order_by(PushToken.id.desc())
        ):
            if len(devices[user_id]) < MAX_DEVICES:
                devices[user_id].append(token)
    invalid: dict[str, datetime] = {}
    if raw:
        invalid = dict(
            session.execute(
                select(PushToken.token, PushToken.invalidated_at).where(
                    PushToken.token.in_(raw), PushToken.invalidated_at.is_not(None)
                )
            ).all()
        )
    claimed = []
    for row in rows:
        one = Claimed(row.id, row.channel, row.attempts, row.recipient)
        try:
            rendered = render(row.template, {} if row.data is None else row.data)
            recipients = resolve(row.channel, row.recipient, policy, devices, invalid)
        except PermanentError as problem:
            one.problem = problem
        except Exception as bug:  # one odd row must not stop the batch it was claimed in
            one.problem = PermanentError(f"cannot prepare: {type(bug).__name__}: {one_line(bug)}")
        else:
            data = {"notification_id": str(row.id), "template": row.template}
            one.messages = [
                Message(row.id, to, rendered.subject, rendered.body, data) for to in recipients
            ]
        claimed.append(one)
    return claimed


def _not_claimed(session: Session, notification_id: int, now: datetime) -> Outcome:
    row = session.execute(
        select(Notification.status, Notification.attempts, Notification.in_flight_until).where(
            Notification.id == notification_id
        )
    ).one_or_none()
    if row is None:
        raise NotFound(f"notifications {notification_id} does not exist")
    if row.status == "SENT":
        result = "already_sent"
    elif row.status == "DEAD":
        result = "already_dead"
    elif row.in_flight_until is not None and row.in_flight_until > now:
        result = "in_flight"
    else:
        result = "not_due"
    return Outcome(notification_id, result, row.attempts)


def resolve(
    channel: str,
    recipient: str,
    policy: Policy,
    devices: dict[str, list[str]],
    invalid: dict[str, datetime],
) -> list[str]:
    """Where the message goes: an address, a phone number, or device tokens. A push token
    marked invalid is never sent to again."""
    if channel == "email" and recipient == OPS_RECIPIENT:
        if not policy.ops_email:
            raise ChannelNotConfigured("ops alerts by email: NOTIFY_OPS_EMAIL is not set")
        return [policy.ops_email]
    if channel != "push":
        return [recipient]
    if recipient.startswith("user:"):
        tokens = devices.get(recipient.removeprefix("user:"))
        if not tokens:
            raise NoPushToken(f"{recipient} has no valid push token")
        return tokens
    if recipient in invalid:
        raise NoPushToken(
            f"push token {mask(recipient)} was marked invalid at "
            f"{invalid[recipient].isoformat()}: not sent"
        )
    return [recipient]


def release(session: Session, notification_ids: Sequence[int], now: datetime) -> None:
    """Give back claimed notifications that were not attempted: their attempt uncounted,
    their lease freed, due again at once."""
    if notification_ids:
        session.execute(
            update(Notification)
            .where(Notification.id.in_(list(notification_ids)))
            .values(in_flight_until=None, attempts=Notification.attempts - 1, updated_at=now)
        )


def send_messages(claimed: Claimed, channels: Channels) -> Sent:
    """Step 2, no transaction open: each message to the channel's provider."""
    channel = getattr(channels, claimed.channel)
    sent = Sent()
    for message in claimed.messages:
        try:
            sent.refs.append(channel.send(message))
        except SoftTimeLimitExceeded:
            raise  # the task's own time is up: not this message's failure
        except TokenUnregistered as gone:
            sent.unregistered.append(gone)
        except (DeliveryTransient, DeliveryPermanent) as error:
            sent.errors.append(error)
        except Exception as bug:  # a message the channel cannot even build: never a retry
            sent.errors.append(DeliveryPermanent(f"{type(bug).__name__}: {one_line(bug)}"))
    return sent


def record_deliveries(
    session: Session,
    results: Sequence[tuple[Claimed, Sent]],
    now: datetime,
    policy: Policy,
    *,
    actor: str,
    task_id: str | None,
    rng: random.Random | None = None,
) -> list[Outcome]:
    """Step 3: every attempt's row, then SENT for all delivered (one audited batch
    transition), and for each failure its next attempt, or DEAD and its dead letter."""
    gone = [token for _, sent in results for token in sent.unregistered]
    if gone:
        invalidate_tokens(session, gone, now)
    attempts: list[dict[str, Any]] = []
    delivered: list[int] = []
    outcomes: list[Outcome] = []
    retries: dict[int, dict[str, Any]] = {}  # the next attempt of each transient failure
    for claimed, sent in results:
        error = claimed.problem or sent.error()
        row = {
            "notification_id": claimed.notification_id,
            "attempt": claimed.attempt,
            "at": now,
        }
        if error is None:
            partial = "; ".join(one_line(e) for e in [*sent.errors, *sent.unregistered])
            refs = ",".join(filter(None, sent.refs))[:256]
            attempts.append(
                {
                    **row,
                    "outcome": "SENT",
                    "error": partial[:2000] or None,
                    "provider_ref": refs or None,
                }
            )
            delivered.append(claimed.notification_id)
            outcomes.append(Outcome(claimed.notification_id, "sent", claimed.attempt))
            log.info(
                "notification.sent",
                extra={
                    "notification_id": claimed.notification_id,
                    "attempt": claimed.attempt,
                    "channel": claimed.channel,
                    "recipient": mask(claimed.recipient),
                },
            )
            continue
        message = f"{type(error).__name__}: {one_line(error)}"[:2000]
        attempts.append(
            {**row, "outcome": classify(error).value, "error": message, "provider_ref": None}
        )
        outcomes.append(
            _failed(session, claimed, error, message, now, policy, actor, task_id, rng, retries)
        )
    session.execute(insert(NotificationAttempt), attempts)
    if retries:  # every transient failure's next attempt in one statement
        update_each(
            session,
            Notification.__table__,
            retries,
            values={"in_flight_until": None, "enqueued_at": now, "updated_at": now},
        )
    if delivered:
        transition_batch(
            session,
            "notifications",
            select(Notification.id).where(Notification.id.in_(delivered)),
            "PENDING",
            "SENT",
            actor=actor,
            reason="delivered",
            now=now,
            values={"sent_at": now, "in_flight_until": None, "last_error": None},
        )
    return outcomes


def _failed(
    session: Session,
    claimed: Claimed,
    error: Exception,
    message: str,
    now: datetime,
    policy: Policy,
    actor: str,
    task_id: str | None,
    rng: random.Random | None,
    retries: dict[int, dict[str, Any]],
) -> Outcome:
    """A failed attempt: the next one scheduled with backoff (its row's update added to
    `retries`, written with the others), or DEAD and a dead letter."""
    notification_id, attempt = claimed.notification_id, claimed.attempt
    extra = {"notification_id": notification_id, "attempt": attempt, "channel": claimed.channel}
    kind = classify(error)
    if kind is Classification.TRANSIENT and attempt < policy.max_attempts:
        delay = policy.delay(attempt, rng)
        retries[notification_id] = {
            "last_error": message,
            "next_attempt_at": now + timedelta(seconds=delay),
        }
        enqueue_after_commit(
            session, "notifications.deliver", {"notification_id": notification_id}, countdown=delay
        )
        log.warning(
            "notification.retry", extra={**extra, "error": scrub(message), "countdown": delay}
        )
        return Outcome(notification_id, "retry", attempt, retry_in=delay, error=message)

    reason = "attempts exhausted" if kind is Classification.TRANSIENT else "permanent error"
    transition(
        session,
        "notifications",
        notification_id,
        "DEAD",
        actor=actor,
        reason=f"{reason}: {message}"[:500],
        now=now,
        values={"in_flight_until": None, "last_error": message},
    )
    letter = record_dead_letter(
        session,
        task_name="notifications.deliver",
        task_id=task_id,
        payload={"notification_id": notification_id},
        error=error,
        attempts=attempt,
        classification=kind,
        now=now,
    )
    log.error(
        "notification.dead",
        extra={**extra, "error": scrub(message), "dead_letter_id": letter, "why": reason},
    )
    return Outcome(notification_id, "dead", attempt, error=message)


def invalidate_tokens(session: Session, gone: Sequence[TokenUnregistered], now: datetime) -> None:
    """Mark device tokens the provider no longer knows invalid, registered or not, so that no
    notification is sent to them again. The first invalidation's time and reason stay."""
    module = postgresql if is_postgres(session) else sqlite
    rows = {
        error.token: {
            "token": error.token,
            "invalidated_at": now,
            "invalid_reason": one_line(error)[:500],
            "created_at": now,
            "updated_at": now,
        }
        for error in gone
    }
    stmt = module.insert(PushToken).values(list(rows.values()))
    table = PushToken.__table__
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["token"],
            set_={
                "invalidated_at": stmt.excluded.invalidated_at,
                "invalid_reason": stmt.excluded.invalid_reason,
                "updated_at": stmt.excluded.updated_at,
            },
            where=table.c.invalidated_at.is_(None),
        )
    )
    for error in gone:
        log.warning("push_token.invalidated", extra={"token": mask(error.token)})


# -- the outbox sweep -----------------------------------------------------------------------------


@dataclass
class SweepResult:
    enqueued: int = 0
    batches: int = 0


def sweep_outbox(
    steps: Steps,
    clock: Clock,
    *,
    after: timedelta,
    batch_size: int = 1000,
    time_budget: float = 30.0,
) -> SweepResult:
    """Deliver again every PENDING notification that is due, not in flight, and whose last
    delivery message should have run at least `after` ago: that message was lost (a broker
    restart, a crash between commit and send), or the row was written by plain SQL with none.
    Each batch is claimed with SKIP LOCKED and marked enqueued before its commit (two sweeps at
    once take each row once), and after the commit one `notifications.deliver_due` pump is
    kicked for the batch, not one message per row: after an outage that lost 50,000 messages
    the pumps deliver them 50 to a claim, as they deliver everyday traffic, instead of 50,000
    single-notification tasks. The pumps claim with SKIP LOCKED and a lease, so a notification
    is delivered once however many pumps run."""

    result = SweepResult()
    deadline = time.monotonic() + time_budget
    while True:
        now = clock()
        stale = now - after
        due = claim(
            select(Notification.id)
            .where(
                Notification.status == "PENDING",
                Notification.next_attempt_at <= now,
                Notification.in_flight_until.is_(None) | (Notification.in_flight_until <= now),
                or_(
                    Notification.enqueued_at.is_(None),
                    and_(Notification.enqueued_at <= stale, Notification.next_attempt_at <= stale),
                ),
            )
            .order_by(Notification.next_attempt_at),
            batch_size,
        )
        with steps.step("batch") as session:
            ids = list(session.execute(due).scalars())
            if ids:
                session.execute(
                    update(Notification).where(Notification.id.in_(ids)).values(enqueued_at=now)
                )
                kick_after_commit(session)
        result.enqueued += len(ids)
        result.batches += 1
        if len(ids) < batch_size or time.monotonic() >= deadline:
            return result


# -- replay preconditions (the tasks' prechecks) -------------------------------------------------


def replay_deliveries(
    session: Session, payloads: Sequence[dict[str, Any]], actor: str
) -> list[str | None]:
    """The replay precheck of `notifications.deliver`, for a whole batch of letters at once:
    a SENT notification is never sent again; the DEAD ones go back to PENDING in one audited
    batch transition, with a fresh set of attempts, due now, for the replayed deliveries to
    send. An invalid payload is let through: its replay dead-letters it again, naming the
    field."""
    wanted = {
        p["notification_id"]
        for p in payloads
        if isinstance(p.get("notification_id"), int) and not isinstance(p["notification_id"], bool)
    }
    statuses = dict(
        session.execute(
            select(Notification.id, Notification.status)
            .where(Notification.id.in_(sorted(wanted)))
            .order_by(Notification.id)
            .with_for_update()
        ).all()
    )
    dead = sorted(key for key, status in statuses.items() if status == "DEAD")
    if dead:
        now = datetime.now(UTC)
        transition_batch(
            session,
            "notifications",
            select(Notification.id).where(Notification.id.in_(dead)),
            "DEAD",
            "PENDING",
            actor=actor,
            reason="dead letter replayed",
            now=now,
            values={
                "attempts": 0,
                "next_attempt_at": now,
                "enqueued_at": now,
                "in_flight_until": None,
            },
        )
    answers: list[str | None] = []
    for payload in payloads:
        notification_id = payload.get("notification_id")
        if notification_id not in wanted:
            answers.append(None)
        elif notification_id not in statuses:
            answers.append(f"notifications {notification_id} does not exist")
        else:
            answers.append("already sent" if statuses[notification_id] == "SENT" else None)
    return answers


def replay_sends(
    session: Session, payloads: Sequence[dict[str, Any]], actor: str
) -> list[str | None]:
    """The replay precheck of `notifications.send`, for a batch: a send whose dedupe key is
    already in the table was recorded, and replaying it would only return that notification."""
    keys = {p["dedupe_key"] for p in payloads if isinstance(p.get("dedupe_key"), str)}
    existing = dict(
        session.execute(
            select(Notification.dedupe_key, Notification.id).where(
                Notification.dedupe_key.in_(sorted(keys))
            )
        ).all()
    )
    answers: list[str | None] = []
    for payload in payloads:
        key = payload.get("dedupe_key")
        found = existing.get(key) if isinstance(key, str) else None
        answers.append(None if found is None else f"already recorded as notification {found}")
    return answers
