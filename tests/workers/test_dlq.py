"""Dead-letter triage, replay and discard on real Postgres; replays land in the real Redis
queue (read back from it), prechecks read the real rows."""

from __future__ import annotations

import base64
import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import Engine, func, select, update

from tests.workers.factories import add_hold
from workers.db import Steps, new_session, session_scope
from workers.dead_letters import HEADER, record_dead_letter
from workers.dlq.browse import Filters
from workers.dlq.bulk import Selection, act_on_selection, preview
from workers.dlq.replay import ReplayError, discard, replay
from workers.dlq.rules import RULES, Rule
from workers.dlq.triage import TriagePolicy, triage
from workers.errors import Classification, NotFound, PayloadError, TransientError
from workers.gateways.base import GatewayPermanent
from workers.models import DeadLetter, DeadLetterEvent, StateTransition

T0 = datetime(2026, 6, 1, 12, tzinfo=UTC)
POLICY = TriagePolicy(
    manual_after=timedelta(days=1),
    replay_budget=2,
    stale_after=timedelta(hours=6),
    batch_size=50,
)


def letter(
    task: str = "holds.expire",
    payload: dict[str, Any] | None = None,
    error: Exception | None = None,
    created: datetime = T0,
) -> int:
    from workers.errors import classify

    error = error or TransientError("database busy")
    with session_scope() as session:
        return record_dead_letter(
            session,
            task_name=task,
            task_id="t-1",
            payload=payload if payload is not None else {"hold_id": 1},
            error=error,
            attempts=9,
            classification=classify(error),
            now=created,
        )


def row(letter_id: int) -> DeadLetter:
    with session_scope() as session:
        found = session.get(DeadLetter, letter_id)
        assert found is not None
        session.expunge(found)
        return found


def sent(redis: redis_lib.Redis) -> list[tuple[str, dict[str, Any], Any]]:
    """Every task message waiting in the broker: (task, kwargs, dead letter header)."""
    messages = []
    for queue in ("critical", "default", "notifications", "batch"):
        for raw in redis.lrange(queue, 0, -1):
            message = json.loads(raw)
            _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
            messages.append((message["headers"]["task"], kwargs, message["headers"].get(HEADER)))
    return messages


def dispatched(redis: redis_lib.Redis) -> list[tuple[str, dict[str, Any], Any]]:
    """Run the `dlq.dispatch` tasks triage queued, as a worker would, and return the replay
    messages then waiting (the dispatch messages themselves taken off the queue)."""
    from workers.dlq.bulk import dispatch

    chunks = [
        kwargs["dead_letter_ids"] for name, kwargs, _ in sent(redis) if name == "dlq.dispatch"
    ]
    redis.delete("default")
    for chunk in chunks:
        with session_scope() as session:
            dispatch(session, chunk)
    return sent(redis)


def run_triage(now: datetime = T0 + timedelta(minutes=15), policy: TriagePolicy = POLICY) -> Any:
    with session_scope() as session:
        return triage(Steps(session), now, policy)


def test_triage_sorts_each_letter_by_the_first_rule_that_matches(
    committed: Engine, redis: redis_lib.Redis
) -> None:
    with session_scope() as session:
        hold = add_hold(session, T0 + timedelta(hours=1))
    transient = letter("holds.expire", {"hold_id": hold})
    invalid = letter("holds.expire", {"hold_id": "x"}, PayloadError("invalid payload: hold_id"))
    gone = letter("holds.expire", {"hold_id": 999}, NotFound("booking_holds 999 does not exist"))
    unknown = letter("refunds.submit", {"refund_id": 5}, RuntimeError("boom"))
    old = letter("holds.expire", {"hold_id": hold}, created=T0 - timedelta(days=2))
    busy = letter(
        "refunds.submit",
        {"refund_id": 6},
        GatewayPermanent("razorpay refund.create: HTTP 400: Server is busy, try again later"),
    )

    counts = run_triage()

    assert row(transient).status == "RETRYING" and row(transient).replays == 1
    assert (row(invalid).status, row(invalid).rule) == ("MANUAL_REVIEW", "invalid-payload")
    assert (row(gone).status, row(gone).rule) == ("DISCARDED", "hold-gone")
    assert "nothing to expire" in (row(gone).resolution or "")
    assert row(unknown).status == "MANUAL_REVIEW"
    assert row(old).status == "MANUAL_REVIEW"  # transient, but older than DLQ_MANUAL_AFTER
    # A provider code the worker sorted as permanent is re-classified by its rule and replayed.
    assert (row(busy).classification, row(busy).status) == ("TRANSIENT", "RETRYING")
    assert (row(busy).rule, row(transient).rule) == ("razorpay-busy", "transient")
    assert counts.as_dict() == {
        "replayed": 2,
        "manual_review": 3,
        "discarded": 1,
        "unnecessary": 0,
        "reclassified": 1,
        "stale": 0,
    }
    replays = sorted(dispatched(redis))
    assert replays == [
        ("holds.expire", {"hold_id": hold}, transient),
        ("refunds.submit", {"refund_id": 6}, busy),
    ]
    with session_scope() as session:
        audit = session.scalar(
            select(func.count())
            .select_from(StateTransition)
            .where(StateTransition.entity == "dead_letters", StateTransition.actor == "dlq.triage")
        )
    assert audit == 6  # every decision is an audited transition


def test_a_replay_with_nothing_left_to_do_is_recorded_as_unnecessary_not_run(
    committed: Engine, redis: redis_lib.Redis
) -> None:
    with session_scope() as session:
        hold = add_hold(session, T0 - timedelta(minutes=1), status="CONFIRMED")
    auto = letter("holds.expire", {"hold_id": hold})
    manual = letter("holds.expire", {"hold_id": hold}, RuntimeError("bug"))
    counts = run_triage()
    assert counts.unnecessary == 1 and row(auto).status == "DISCARDED"
    assert row(auto).resolution == f"replay unnecessary: hold {hold} is already CONFIRMED"
    with session_scope() as session:
        [outcome] = replay(session, [manual], actor="ops:alice", reason="bug fixed", now=T0)
    assert (outcome.outcome, outcome.detail) == ("unnecessary", f"hold {hold} is already CONFIRMED")
    assert row(manual).status == "DISCARDED"
    assert sent(redis) == []


def test_a_letter_is_replayed_automatically_only_within_its_budget(
    committed: Engine, redis: redis_lib.Redis
) -> None:
    with session_scope() as session:
        hold = add_hold(session, T0 + timedelta(hours=1))
    letter_id = letter("holds.expire", {"hold_id": hold})
    for round_ in range(3):
        run_triage(T0 + timedelta(minutes=15 * (round_ + 1)))
        if row(letter_id).status == "RETRYING":
            # What the base task does when the replay fails again.
            with session_scope() as session:
                from workers.dead_letters import replay_failed

                replay_failed(
                    session,
                    letter_id,
                    task_id=f"r{round_}",
                    payload={"hold_id": hold},
                    error=TransientError("database busy again"),
                    attempts=9,
                    classification=Classification.TRANSIENT,
                    now=T0 + timedelta(minutes=15 * (round_ + 1), seconds=5),
                )
    final = row(letter_id)
    assert (final.status, final.replays) == ("MANUAL_REVIEW", 2)
    assert final.error_message == "database busy again" and final.attempts == 9 * 3
    # Two replays were queued for dispatch, one per round within the budget.
    assert [name for name, _, _ in sent(redis)] == ["dlq.dispatch", "dlq.dispatch"]


def test_two_triage_runs_at_once_replay_each_letter_at_most_once(
    committed: Engine, redis: redis_lib.Redis
) -> None:
    with session_scope() as session:
        holds = [add_hold(session, T0 + timedelta(hours=1)) for _ in range(40)]
    ids = [letter("holds.expire", {"hold_id": hold}) for hold in holds for _ in range(5)]
    policy = TriagePolicy(**{**POLICY.__dict__, "batch_size": 7})
    barrier = threading.Barrier(2)
    results: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        session = new_session()
        try:
            barrier.wait()
            results.append(triage(Steps(session), T0 + timedelta(minutes=15), policy))
            session.commit()
        except BaseException as exc:
            errors.append(exc)
        finally:
            session.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    headers = [header for _, _, header in dispatched(redis)]
    assert sorted(headers) == sorted(ids)  # every letter replayed once, none twice
    assert sum(result.replayed for result in results) == len(ids)
    assert all(result.replayed > 0 for result in results)  # both runs did part of the work


def test_an_edited_replay_is_validated_and_its_diff_recorded(
    committed: Engine, redis: redis_lib.Redis
) -> None:
    with session_scope() as session:
        hold = add_hold(session, T0 + timedelta(hours=1))
    bad = letter("holds.expire", {"hold_id": "12"}, PayloadError("invalid payload: hold_id"))
    with session_scope() as session, pytest.raises(ReplayError, match="hold_id"):
        replay(session, [bad], actor="ops:alice", reason="fix", now=T0, edit={"hold_id": "13"})
    assert row(bad).status == "NEW" and sent(redis) == []
    with session_scope() as session:
        [outcome] = replay(
            session,
            [bad],
            actor="ops:alice",
            reason="id was a string",
            now=T0,
            edit={"hold_id": hold},
        )
    assert outcome.outcome == "replayed" and outcome.diff == {"hold_id": ["12", hold]}
    assert (row(bad).status, row(bad).payload) == ("RETRYING", {"hold_id": hold})
    assert sent(redis) == [("holds.expire", {"hold_id": hold}, bad)]
    with session_scope() as session:
        events = session.execute(
            select(
                DeadLetterEvent.action,
                DeadLetterEvent.actor,
                DeadLetterEvent.reason,
                DeadLetterEvent.detail,
            )
        ).all()
    assert events == [
        ("replayed", "ops:alice", "id was a string", {"diff": {"hold_id": ["12", hold]}})
    ]


def test_discard_needs_a_reason_and_closes_only_open_letters(committed: Engine) -> None:
    first, second = letter(), letter()
    with session_scope() as session, pytest.raises(ReplayError, match="reason"):
        discard(session, [first], actor="ops:bob", reason=" ", now=T0)
    with session_scope() as session:
        outcomes = discard(session, [first, 404], actor="ops:bob", reason="duplicate", now=T0)
    assert [o.outcome for o in outcomes] == ["discarded", "not_found"]
    with session_scope() as session:
        again = discard(session, [first, second], actor="ops:bob", reason="dup", now=T0)
    assert [o.outcome for o in again] == ["skipped", "discarded"]
    assert (row(first).status, row(first).resolution) == ("DISCARDED", "duplicate")
    with session_scope() as session:
        who = session.execute(
            select(StateTransition.actor, StateTransition.reason).where(
                StateTransition.entity == "dead_letters", StateTransition.entity_id == first
            )
        ).all()
    assert who == [("ops:bob", "duplicate")]


def test_a_replay_that_reports_nothing_goes_to_manual_review(
    committed: Engine, redis: redis_lib.Redis
) -> None:
    with session_scope() as session:
        hold = add_hold(session, T0 + timedelta(hours=1))
    letter_id = letter("holds.expire", {"hold_id": hold})
    run_triage(T0)
    assert row(letter_id).status == "RETRYING"
    counts = run_triage(T0 + timedelta(hours=7))
    assert counts.stale == 1 and row(letter_id).status == "MANUAL_REVIEW"


def test_rules_are_one_readable_table_and_first_match_wins() -> None:
    names = [rule.name for rule in RULES]
    assert len(names) == len(set(names))
    assert all(rule.action in ("replay", "manual", "discard") for rule in RULES)
    assert all(rule.reason for rule in RULES)
    probe = type(
        "Letter",
        (),
        {
            "task_name": "holds.expire",
            "error_type": "NotFound",
            "classification": "PERMANENT",
            "error_message": "booking_holds 1 does not exist",
        },
    )()
    from workers.dlq.rules import match

    assert match(probe).name == "hold-gone"
    assert match(probe, (Rule("all", "manual", "x"), *RULES)).name == "all"


def test_a_rule_selects_in_sql_exactly_the_letters_it_matches_in_python(
    committed: Engine,
) -> None:
    """Triage decides letter by letter with `matches` and re-labels in bulk with `where`:
    both must agree, `_` and `%` in task names included."""
    names = ["refunds.check_many", "refunds.checkXmany", "refunds.check%many", "holds.expire"]
    errors = [
        TransientError("database busy"),
        NotFound("booking_holds 1 does not exist"),
        GatewayPermanent("razorpay refund.create: HTTP 400: Server is busy, try again later"),
        PayloadError("invalid payload: hold_id"),
    ]
    ids = [letter(name, {"n": n}, error) for n, name in enumerate(names) for error in errors]
    probes = [
        Rule("exact", "manual", "x", task="refunds.check_many"),
        Rule("percent", "manual", "x", task="refunds.check%many"),
        Rule("one", "manual", "x", task="refunds.check?many"),
        Rule("prefix", "manual", "x", task="refunds.*", message=r"busy|does not"),
    ]
    with session_scope() as session:
        letters = session.scalars(select(DeadLetter).where(DeadLetter.id.in_(ids))).all()
        for rule in (*RULES, *probes):
            selected = set(session.scalars(select(DeadLetter.id).where(rule.where())))
            assert selected == {x.id for x in letters if rule.matches(x)}, rule.name
        exact = set(session.scalars(select(DeadLetter.task_name).where(probes[0].where())))
        assert exact == {"refunds.check_many"}


def test_triage_runs_on_the_embedded_sqlite_default_too(any_db: Any) -> None:
    """`make run` triages on SQLite: the same decisions, the per-letter resolutions included."""
    from workers.models import BookingHold

    session = any_db
    final = BookingHold(
        resource_id="r", user_id="u", start_time=T0, end_time=T0, expires_at=T0, status="EXPIRED"
    )
    session.add(final)
    session.flush()
    ids = [
        record_dead_letter(
            session,
            task_name="holds.expire",
            task_id=None,
            payload={"hold_id": final.id},
            error=error,
            attempts=1,
            classification=Classification(kind),
            now=T0,
        )
        for error, kind in (
            (TransientError("busy"), "TRANSIENT"),
            (NotFound("booking_holds 7 does not exist"), "PERMANENT"),
            (RuntimeError("bug"), "UNKNOWN"),
        )
    ]
    counts = triage(Steps(session), T0 + timedelta(minutes=1), POLICY)
    assert (counts.unnecessary, counts.discarded, counts.manual_review) == (1, 1, 1)
    rows = {
        letter.id: (letter.status, letter.resolution)
        for letter in session.scalars(select(DeadLetter).where(DeadLetter.id.in_(ids)))
    }
    assert rows[ids[0]] == ("DISCARDED", f"replay unnecessary: hold {final.id} is already EXPIRED")
    assert rows[ids[1]][0] == "DISCARDED" and rows[ids[2]] == ("MANUAL_REVIEW", None)


def bulk(actor: str, batch_size: int = 50, **filters: Any) -> Any:
    with session_scope() as session:
        return act_on_selection(
            Steps(session),
            Selection(Filters(**filters), T0 + timedelta(hours=1)),
            "replay",
            actor=actor,
            reason="gateway is back",
            now=T0 + timedelta(hours=1),
            batch_size=batch_size,
        )


def test_two_bulk_replays_over_the_same_letters_replay_each_exactly_once(
    committed: Engine, redis: redis_lib.Redis
) -> None:
    with session_scope() as session:
        holds = [add_hold(session, T0 + timedelta(hours=2)) for _ in range(60)]
    ids = [letter("holds.expire", {"hold_id": hold}) for hold in holds for _ in range(5)]
    barrier = threading.Barrier(2)
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def run(actor: str) -> None:
        try:
            barrier.wait()
            results[actor] = bulk(actor, batch_size=20, task="holds.*")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("alice", "bob")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    headers = [header for _, _, header in dispatched(redis)]
    assert sorted(headers) == sorted(ids)  # every letter sent once, none twice
    assert results["alice"].replayed + results["bob"].replayed == len(ids)
    with session_scope() as session:
        events = session.execute(
            select(DeadLetterEvent.dead_letter_id, DeadLetterEvent.actor).where(
                DeadLetterEvent.action == "replayed"
            )
        ).all()
        moves = session.execute(
            select(StateTransition.entity_id, StateTransition.actor).where(
                StateTransition.entity == "dead_letters",
                StateTransition.to_status == "RETRYING",
            )
        ).all()
        replays = set(session.scalars(select(DeadLetter.replays).where(DeadLetter.id.in_(ids))))
    # Audited once per letter, with the name of the run that replayed it.
    assert sorted(letter_id for letter_id, _ in events) == sorted(ids)
    assert sorted(moves) == sorted(events)
    for actor, result in results.items():
        assert sum(1 for _, who in events if who == actor) == result.replayed
    assert replays == {1}


def test_a_bulk_replay_closes_what_has_nothing_left_to_do_and_takes_no_later_letter(
    committed: Engine, redis: redis_lib.Redis
) -> None:
    with session_scope() as session:
        open_hold = add_hold(session, T0 + timedelta(hours=2))
        done_hold = add_hold(session, T0 + timedelta(hours=2), status="CONFIRMED")
    changed = letter("holds.expire", {"hold_id": open_hold})
    with session_scope() as session:
        session.execute(
            update(DeadLetter).where(DeadLetter.id == changed).values(status="RETRYING")
        )
    wanted = letter("holds.expire", {"hold_id": open_hold})
    finished = letter("holds.expire", {"hold_id": done_hold})
    with session_scope() as session:
        seen = preview(session, Selection(Filters(task="holds.*"), T0), "replay")
    assert (seen.count, seen.up_to, seen.by_task) == (2, finished, [("holds.expire", 2)])
    later = letter("holds.expire", {"hold_id": open_hold})  # arrives after the count was shown
    with session_scope() as session:  # a replay in flight when counted fails back to NEW after
        session.execute(
            update(DeadLetter)
            .where(DeadLetter.id == changed)
            .values(status="NEW", updated_at=T0 + timedelta(seconds=1))
        )
    with session_scope() as session:
        counts = act_on_selection(
            Steps(session),
            Selection(Filters(task="holds.*"), T0, up_to=seen.up_to),
            "replay",
            actor="alice",
            reason="gateway is back",
            now=T0,
        )
    assert counts.as_dict() == {"taken": 2, "replayed": 1, "unnecessary": 1, "discarded": 0}
    assert [row(i).status for i in (wanted, finished, later, changed)] == [
        "RETRYING",
        "DISCARDED",
        "NEW",
        "NEW",
    ]
    assert row(finished).resolution.startswith("replay unnecessary: ")  # type: ignore[union-attr]
    assert [header for _, _, header in dispatched(redis)] == [wanted]


def test_triage_leaves_an_event_on_every_letter_it_decides(
    committed: Engine, redis: redis_lib.Redis
) -> None:
    with session_scope() as session:
        hold = add_hold(session, T0 + timedelta(hours=1))
    replayed = letter("holds.expire", {"hold_id": hold})
    manual = letter("refunds.submit", {"refund_id": 1}, PayloadError("invalid payload: x"))
    run_triage()
    with session_scope() as session:
        events = dict(
            session.execute(select(DeadLetterEvent.dead_letter_id, DeadLetterEvent.action)).all()
        )
    assert events == {replayed: "replayed", manual: "manual_review"}
