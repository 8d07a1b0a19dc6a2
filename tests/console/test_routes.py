"""Every console page and action through Flask's test client, on the real Postgres: who may
see and do what, CSRF, the headers, what an action writes (with the operator's own name), and
that nothing secret or live is rendered."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Flask
from sqlalchemy import select

from config.settings import load_settings
from tasks.dlq import selection_of
from tests.console.conftest import csrf, log_in, new_letter, post
from tests.workers.factories import add_hold
from tests.workers.test_dlq import sent
from tests.workers.test_reconciliation_review import add_run
from tests.workers.test_refunds import add_refund, refund, set_row, submit
from workers.console import create_app
from workers.console.auth import ConsoleConfigError
from workers.db import Steps, session_scope, transition
from workers.dlq.bulk import act_on_selection
from workers.errors import PermanentError
from workers.models import DeadLetter, DeadLetterEvent, JobRun, StateTransition
from workers.payloads import BulkDeadLetters, validate


def status(letter_id: int) -> str:
    with session_scope() as session:
        return session.get(DeadLetter, letter_id).status  # type: ignore[union-attr]


def audit(letter_id: int) -> list[tuple[str, str]]:
    with session_scope() as session:
        return [
            (row.to_status, row.actor)
            for row in session.scalars(
                select(StateTransition)
                .where(
                    StateTransition.entity == "dead_letters",
                    StateTransition.entity_id == letter_id,
                )
                .order_by(StateTransition.id)
            )
        ]


def test_a_wrong_password_is_refused_and_repeated_failures_are_throttled(
    console_app: Flask, redis: Any
) -> None:
    client = console_app.test_client()
    refused = log_in(client, "alice", "not-her-password")
    assert refused.status_code == 401 and "wrong name or password" in refused.get_data(True)
    assert client.get("/dead-letters").status_code == 302  # still not logged in
    for _ in range(4):
        log_in(client, "alice", "still-wrong")
    throttled = log_in(client, "alice")  # the right password, after 5 failures: not now
    assert throttled.status_code == 429


def test_pages_need_a_user_and_an_operator_logs_in(console_app: Flask, redis: Any) -> None:
    client = console_app.test_client()
    first = client.get("/dead-letters?task=holds.*")
    assert first.status_code == 302 and first.headers["Location"].startswith("/login?next=")
    done = log_in(client, "alice")
    assert done.status_code == 302
    page = client.get("/dead-letters")
    assert page.status_code == 200 and "alice (operator)" in page.get_data(True)


def test_the_list_groups_filters_and_pages_by_id(console_app: Flask, redis: Any) -> None:
    ids = [new_letter("holds.expire", {"hold_id": i}) for i in range(60)]
    other = new_letter("refunds.submit", {"refund_id": 1}, PermanentError("refused"))
    client = console_app.test_client()
    log_in(client, "alice")
    html = client.get("/dead-letters").get_data(True)
    assert ">60<" in html and ">1<" in html  # the groups' counts
    filtered = client.get("/dead-letters?task=refunds.*").get_data(True)
    assert f"/dead-letters/{other}" in filtered and f'/dead-letters/{ids[0]}"' not in filtered
    first = client.get("/dead-letters?task=holds.*").get_data(True)
    assert f'/dead-letters/{ids[-1]}"' in first and f'/dead-letters/{ids[9]}"' not in first
    assert f"before={ids[10]}" in first  # the next page starts below the last id shown
    second = client.get(f"/dead-letters?task=holds.*&before={ids[10]}").get_data(True)
    assert f'/dead-letters/{ids[9]}"' in second and f'/dead-letters/{ids[0]}"' in second


def test_markup_in_a_letter_renders_inert(console_app: Flask, redis: Any) -> None:
    letter = new_letter(
        "holds.expire",
        {"hold_id": '<img src=x onerror="alert(1)">'},
        PermanentError("<script>alert('boom')</script>"),
    )
    client = console_app.test_client()
    log_in(client, "alice")
    html = client.get(f"/dead-letters/{letter}").get_data(True)
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(&#39;boom&#39;)&lt;/script&gt;" in html
    listing = client.get("/dead-letters").get_data(True)
    assert "<script>alert" not in listing


def test_an_invalid_edit_is_refused_with_nothing_sent_then_a_valid_one_is_replayed_as_alice(
    console_app: Flask, redis: Any
) -> None:
    with session_scope() as session:
        hold = add_hold(session, datetime.now(UTC) - timedelta(seconds=5))
    letter = new_letter("holds.expire", {"hold_id": "abc"})
    client = console_app.test_client()
    log_in(client, "alice")
    page = f"/dead-letters/{letter}"
    bad = post(client, f"{page}/replay", page, payload='{"hold_id": "x"}', reason="fix")
    assert (
        bad.status_code == 422
        and "Not sent: holds.expire: invalid payload: hold_id" in bad.get_data(True)
    )
    broken = post(client, f"{page}/replay", page, payload="{not json", reason="fix")
    assert broken.status_code == 422
    assert status(letter) == "NEW" and redis.llen("critical") == 0

    preview = post(client, f"{page}/replay", page, payload=f'{{"hold_id": {hold}}}', reason="fix")
    html = preview.get_data(True)
    assert preview.status_code == 200 and "Replay now" in html
    assert "&#34;abc&#34;" in html and f"<td>{hold}</td>" in html  # the diff, before and after
    assert status(letter) == "NEW" and redis.llen("critical") == 0  # a preview sends nothing

    done = client.post(
        f"{page}/replay",
        data={
            "payload": f'{{"hold_id": {hold}}}',
            "reason": "fix",
            "confirm": "yes",
            "csrf_token": csrf(html),
        },
    )
    assert done.status_code == 302
    assert status(letter) == "RETRYING" and audit(letter) == [("RETRYING", "alice")]
    assert redis.llen("critical") == 1  # the replay, sent once the transaction committed
    with session_scope() as session:
        event = session.scalars(select(DeadLetterEvent)).one()
        assert (event.action, event.actor, event.detail) == (
            "replayed",
            "alice",
            {"diff": {"hold_id": ["abc", hold]}},
        )


def test_a_discard_needs_a_reason_and_is_audited_with_the_operators_name(
    console_app: Flask, redis: Any
) -> None:
    letter = new_letter("holds.expire", {"hold_id": 1})
    client = console_app.test_client()
    log_in(client, "alice")
    page = f"/dead-letters/{letter}"
    assert post(client, f"{page}/discard", page, reason="  ").status_code == 422
    assert post(client, f"{page}/discard", page, reason="hold deleted").status_code == 302
    assert status(letter) == "DISCARDED" and audit(letter) == [("DISCARDED", "alice")]


def test_a_bulk_replay_counts_first_then_one_task_replays_what_was_shown_as_alice(
    console_app: Flask, redis: Any
) -> None:
    with session_scope() as session:
        hold = add_hold(session, datetime.now(UTC) + timedelta(hours=1))
    ids = [new_letter("holds.expire", {"hold_id": hold}) for _ in range(30)]
    other = new_letter("refunds.submit", {"refund_id": 7})
    client = console_app.test_client()
    log_in(client, "alice")
    page = "/dead-letters?task=holds.*&status=NEW"
    assert "Count and confirm" in client.get(page).get_data(True)
    counted = post(
        client,
        "/dead-letters/bulk",
        page,
        action="replay",
        reason="outage over",
        task="holds.*",
        status="NEW",
    )
    html = counted.get_data(True)
    assert counted.status_code == 200 and "Replay 30 dead letters" in html
    assert {status(i) for i in ids} == {"NEW"} and sent(redis) == []  # counting sends nothing
    later = new_letter("holds.expire", {"hold_id": hold})  # arrives after the count was shown

    done = client.post(
        "/dead-letters/bulk",
        data={
            **dict(
                re.findall(r'name="([a-z_]+)" value="([^"]*)"', html.split('class="confirm"')[1])
            ),
            "csrf_token": csrf(html),
        },
    )
    assert done.status_code == 302 and done.headers["Location"].startswith("/dead-letters?")
    [(name, payload, _)] = sent(redis)
    assert name == "dlq.bulk"
    assert (payload["action"], payload["actor"], payload["task"]) == ("replay", "alice", "holds.*")
    assert payload["up_to_id"] == max(ids)
    redis.delete("default")
    bulk = validate(BulkDeadLetters, payload)
    with session_scope() as session:  # what the worker's dlq.bulk runs
        counts = act_on_selection(
            Steps(session),
            selection_of(bulk),
            bulk.action,
            actor=bulk.actor,
            reason=bulk.reason,
            now=datetime.now(UTC),
        )
    assert (counts.taken, counts.replayed) == (30, 30)
    assert {status(i) for i in ids} == {"RETRYING"} and status(later) == status(other) == "NEW"
    assert audit(ids[0]) == [("RETRYING", "alice")]


def test_a_bulk_action_needs_an_operator_and_a_reason(console_app: Flask, redis: Any) -> None:
    letter = new_letter("holds.expire", {"hold_id": 1})
    client = console_app.test_client()
    log_in(client, "victor")
    page = "/dead-letters"
    assert "Count and confirm" not in client.get(page).get_data(True)
    forged = post(client, "/dead-letters/bulk", page, action="discard", reason="x", confirm="yes")
    assert forged.status_code == 403
    client = console_app.test_client()
    log_in(client, "alice")
    blank = post(client, "/dead-letters/bulk", page, action="discard", reason=" ")
    assert blank.status_code == 302
    assert "a bulk discard needs a reason" in client.get(blank.headers["Location"]).get_data(True)
    tampered = post(
        client,
        "/dead-letters/bulk",
        page,
        action="discard",
        reason="x",
        confirm="yes",
        as_of_ms="-5",
    )
    assert tampered.status_code == 302 and sent(redis) == [] and status(letter) == "NEW"


def test_a_viewer_sees_no_actions_and_a_forged_post_is_forbidden(
    console_app: Flask, redis: Any
) -> None:
    letter = new_letter("holds.expire", {"hold_id": 1})
    client = console_app.test_client()
    log_in(client, "victor")
    page = f"/dead-letters/{letter}"
    html = client.get(page).get_data(True)
    assert "victor (viewer)" in html and "Replay" not in html and "Discard" not in html
    for action in ("replay", "discard"):
        forged = post(client, f"{page}/{action}", page, reason="x", confirm="yes")
        assert forged.status_code == 403
    assert status(letter) == "NEW"


def test_a_post_without_its_csrf_token_is_refused(console_app: Flask, redis: Any) -> None:
    letter = new_letter("holds.expire", {"hold_id": 1})
    client = console_app.test_client()
    log_in(client, "alice")
    refused = client.post(f"/dead-letters/{letter}/discard", data={"reason": "no token"})
    assert refused.status_code == 400 and status(letter) == "NEW"
    login = client.post("/login", data={"username": "alice", "password": "alice-operator-pw"})
    assert login.status_code == 400


def test_every_response_carries_the_security_headers_and_a_strict_cookie(
    console_app: Flask, redis: Any
) -> None:
    client = console_app.test_client()
    response = log_in(client, "alice")
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    page = client.get("/dead-letters")
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert page.headers["X-Frame-Options"] == "DENY"
    assert "<script>" not in page.get_data(True) and "style=" not in page.get_data(True)


def test_secure_cookies_outside_local_development(committed: Any, console_users: str) -> None:
    app = create_app(load_settings(CONSOLE_USERS=console_users))
    app.config["TESTING"] = True
    client = app.test_client()
    assert "Secure" in log_in(client, "alice").headers["Set-Cookie"]


def test_a_trusted_proxy_names_the_user_and_anyone_else_is_not_believed(
    console_app: Flask, redis: Any
) -> None:
    letter = new_letter("holds.expire", {"hold_id": 1})
    behind = console_app.test_client()
    page = behind.get(
        f"/dead-letters/{letter}",
        headers={"X-Forwarded-Email": "olga@example.com"},
        environ_base={"REMOTE_ADDR": "10.1.2.3"},
    )
    assert page.status_code == 200 and "olga@example.com (operator)" in page.get_data(True)
    viewer = behind.get(
        "/dead-letters",
        headers={"X-Forwarded-Email": "pat@example.com"},
        environ_base={"REMOTE_ADDR": "10.1.2.3"},
    )
    assert "pat@example.com (viewer)" in viewer.get_data(True)
    spoofed = console_app.test_client().get(
        "/dead-letters",
        headers={"X-Forwarded-Email": "olga@example.com"},
        environ_base={"REMOTE_ADDR": "192.0.2.9"},
    )
    assert spoofed.status_code == 302  # not from a trusted proxy: log in


def test_a_webhook_letters_body_and_signature_are_never_shown(
    console_app: Flask, redis: Any
) -> None:
    letter = new_letter(
        "webhooks.process",
        {"provider": "stripe", "body": '{"secret_card": "4242"}', "signature": "t=1,v1=deadbeef"},
    )
    client = console_app.test_client()
    log_in(client, "alice")
    html = client.get(f"/dead-letters/{letter}").get_data(True)
    assert "deadbeef" not in html and "4242" not in html
    assert "redacted" in html


def test_the_console_refuses_to_start_without_a_way_to_know_its_users() -> None:
    for settings, named in (
        ({}, "CONSOLE_USERS"),
        ({"CONSOLE_USERS": "alice:admin:plain"}, "CONSOLE_USERS: bad entry for 'alice'"),
        ({"CONSOLE_TRUSTED_USER_HEADER": "X-Forwarded-Email"}, "CONSOLE_TRUSTED_PROXIES"),
    ):
        try:
            create_app(load_settings(**settings))
        except ConsoleConfigError as exc:
            assert named in str(exc) and "\n" not in str(exc)
        else:
            raise AssertionError(f"started with {settings}")


def test_refunds_that_need_a_person_are_listed_and_acted_on_as_alice(
    console_app: Flask, redis: Any, sim: Any, gateways: dict[str, Any]
) -> None:
    console_app.extensions["backstop"]["gateway_for"] = gateways.__getitem__
    sim.set_refund_outcome("stripe", "pending")
    in_review = add_refund(sim, "stripe")
    assert submit(in_review, gateways) == "PROCESSING"
    set_row(in_review, requires_manual_review=True)
    failed = add_refund(sim, "razorpay", amount=9_000, paid=5_000)
    assert submit(failed, gateways) == "FAILED"
    set_row(failed, requires_manual_review=True)
    client = console_app.test_client()
    log_in(client, "alice")
    html = client.get("/refunds").get_data(True)
    assert f'href="/refunds/{in_review}"' in html and f'href="/refunds/{failed}"' in html
    assert sim.stripe_api_key not in html and sim.razorpay_key_secret not in html

    page = f"/refunds/{in_review}"
    shown = client.get(page).get_data(True)
    assert "Re-check now" in shown and "Start a new attempt" not in shown
    sim.settle_refund(refund(in_review).gateway_refund_id, "succeeded")
    done = post(client, f"{page}/recheck", page)
    assert done.status_code == 302
    assert "PROCESSING -&gt; COMPLETED" in client.get(page).get_data(True)
    assert refund(in_review).status == "COMPLETED"

    page = f"/refunds/{failed}"
    refused = post(client, f"{page}/retry", page, reason=" ")
    assert refused.status_code == 422 and "a new attempt needs a reason" in refused.get_data(True)
    assert post(client, f"{page}/resolve", page, reason="refunded in cash").status_code == 302
    assert refund(failed).resolution == "refunded in cash"
    with session_scope() as session:
        actors = {
            row.actor
            for row in session.scalars(
                select(StateTransition).where(StateTransition.entity == "refunds")
            )
            if row.actor not in ("refunds.submit",)
        }
    assert actors == {"alice"}
    assert f'href="/refunds/{failed}"' not in client.get("/refunds").get_data(True)


def test_a_viewer_reads_refunds_but_cannot_act(console_app: Flask, redis: Any, sim: Any) -> None:
    refund_id = add_refund(sim, "stripe")
    set_row(refund_id, status="FAILED", requires_manual_review=True)
    client = console_app.test_client()
    log_in(client, "victor")
    page = f"/refunds/{refund_id}"
    html = client.get(page).get_data(True)
    assert f"Refund {refund_id}" in html and "Mark resolved" not in html
    for action in ("recheck", "retry", "resolve"):
        assert post(client, f"{page}/{action}", page, reason="x").status_code == 403
    assert refund(refund_id).resolved_at is None
    assert client.get("/refunds/999999").status_code == 404


def test_reconciliation_runs_and_findings_acknowledged_and_resolved_as_alice(
    console_app: Flask, redis: Any
) -> None:
    run_id, ids = add_run(findings=3, fixed=1)
    client = console_app.test_client()
    log_in(client, "alice")
    runs = client.get("/reconciliation").get_data(True)
    assert f'href="/reconciliation/{run_id}"' in runs and "42.0s" in runs
    page = f"/reconciliation/{run_id}?waiting=1"
    html = client.get(page).get_data(True)
    assert f'id="finding-{ids[0]}"' not in html and f'id="finding-{ids[1]}"' in html
    assert "Acknowledge" in html
    action = f"/reconciliation/findings/{ids[1]}"
    blank = post(client, f"{action}/acknowledge", page, reason=" ", back=page)
    assert "a reason is needed" in client.get(blank.headers["Location"]).get_data(True)
    assert post(client, f"{action}/acknowledge", page, reason="on it", back=page).status_code == 302
    done = post(client, f"{action}/resolve", page, reason="captured late; fixed by hand", back=page)
    assert done.headers["Location"] == page
    shown = client.get(page).get_data(True)
    assert f"finding {ids[1]}: RESOLVED" in shown and f'id="finding-{ids[1]}"' not in shown
    with session_scope() as session:
        trail = [
            (row.to_status, row.actor)
            for row in session.scalars(
                select(StateTransition)
                .where(StateTransition.entity_id == ids[1])
                .where(StateTransition.entity == "reconciliation_discrepancies")
                .order_by(StateTransition.id)
            )
        ]
    assert trail == [("ACKNOWLEDGED", "alice"), ("RESOLVED", "alice")]


def test_a_viewer_reads_findings_but_cannot_review_them(console_app: Flask, redis: Any) -> None:
    run_id, ids = add_run()
    client = console_app.test_client()
    log_in(client, "victor")
    page = f"/reconciliation/{run_id}"
    html = client.get(page).get_data(True)
    assert f'id="finding-{ids[1]}"' in html and "Acknowledge" not in html
    forged = post(client, f"/reconciliation/findings/{ids[1]}/resolve", page, reason="x")
    assert forged.status_code == 403
    assert client.get("/reconciliation/999999").status_code == 404


def test_schedules_show_every_job_and_run_now_claims_the_slot_as_alice(
    console_app: Flask, redis: Any
) -> None:
    client = console_app.test_client()
    log_in(client, "alice")
    html = client.get("/schedules").get_data(True)
    for job in ("refunds.retry_stuck", "dlq.triage", "holds.sweep_expired", "ops.retention"):
        assert f'id="job-{job}"' in html
    assert "Run now</button>" in html
    done = post(client, "/schedules/dlq.triage/run", "/schedules")
    assert done.status_code == 302
    shown = client.get("/schedules").get_data(True)
    assert "dlq.triage: sent as task" in shown and "as alice" in shown
    [(name, _, _)] = sent(redis)
    assert name == "dlq.triage"
    with session_scope() as session:
        row = session.scalars(select(JobRun).where(JobRun.job_name == "dlq.triage")).one()
    assert row.requested_by == "alice"
    again = post(client, "/schedules/dlq.triage/run", "/schedules")
    assert "not run: dlq.triage: the current slot" in client.get(
        again.headers["Location"]
    ).get_data(True)
    assert len(sent(redis)) == 1


def test_a_viewer_sees_the_schedules_but_cannot_run_a_job(console_app: Flask, redis: Any) -> None:
    client = console_app.test_client()
    log_in(client, "victor")
    html = client.get("/schedules").get_data(True)
    assert 'id="job-dlq.triage"' in html and "Run now</button>" not in html
    assert post(client, "/schedules/dlq.triage/run", "/schedules").status_code == 403
    assert sent(redis) == []


def test_the_overview_shows_health_queues_and_what_happened_as_charts(
    console_app: Flask, redis: Any
) -> None:
    opened = [new_letter("holds.expire", {"hold_id": i}) for i in range(3)]
    client = console_app.test_client()
    log_in(client, "alice")
    page = f"/dead-letters/{opened[0]}"
    post(client, f"{page}/discard", page, reason="test data")
    redis.rpush("critical", "x", "y")
    with session_scope() as session:
        hold = add_hold(session, datetime.now(UTC) - timedelta(seconds=30))
        transition(
            session, "booking_holds", hold, "EXPIRED", actor="t", reason=None, now=datetime.now(UTC)
        )
    html = client.get("/").get_data(True)
    assert "<h2>Health</h2>" in html and "schedule dlq.triage" in html and "database" in html
    assert '<td>critical</td><td class="num">2</td>' in html
    assert html.count('<svg role="img"') == 3
    hour = datetime.now(UTC).strftime("%d %H:00")
    assert f"<title>{hour}: opened 3</title>" in html and f"<title>{hour}: closed 1</title>" in html
    assert "(1 expired)" in html
    assert "<script" not in html
    viewer = console_app.test_client()
    log_in(viewer, "victor")
    assert viewer.get("/").status_code == 200


def test_the_list_shows_open_letters_unless_a_status_is_chosen(
    console_app: Flask, redis: Any
) -> None:
    kept = new_letter("holds.expire", {"hold_id": 1})
    gone = new_letter("holds.expire", {"hold_id": 2})
    client = console_app.test_client()
    log_in(client, "alice")
    page = f"/dead-letters/{gone}"
    post(client, f"{page}/discard", page, reason="test data")

    def shown(query: str) -> set[int]:
        html = client.get(f"/dead-letters{query}").get_data(True)
        return {int(i) for i in re.findall(r'<a href="/dead-letters/(\d+)">', html)}

    assert shown("") == {kept}
    assert shown("?status=DISCARDED") == {gone}
    assert shown("?status=any") == {kept, gone}


def test_no_secret_key_or_signature_appears_on_any_page(
    committed: Any, console_users: str, redis: Any, sim: Any
) -> None:
    """Every page, with data behind it, rendered for an operator: none carries a credential
    from the settings, a user's password hash, or a webhook's signature."""
    secrets_ = {
        "CONSOLE_SECRET_KEY": "console-secret-never-shown",
        "STRIPE_API_KEY": "sk_test_never_shown_123",
        "RAZORPAY_KEY_ID": "rzp_test_key_id",
        "RAZORPAY_KEY_SECRET": "rzp_secret_never_shown",
        "STRIPE_WEBHOOK_SECRET": "whsec_never_shown",
        "SENTRY_DSN": "https://publickey@sentry.example.com/1",
    }
    app = create_app(
        load_settings(CONSOLE_USERS=console_users, CONSOLE_COOKIE_SECURE=False, **secrets_)
    )
    letter = new_letter(
        "webhooks.process",
        {"provider": "stripe", "body": "{}", "signature": "t=1,v1=signature_never_shown"},
    )
    refund_id = add_refund(sim, "stripe")
    set_row(refund_id, status="FAILED", requires_manual_review=True)
    run_id, _ = add_run()
    client = app.test_client()
    log_in(client, "alice")
    pages = [
        "/",
        "/dead-letters",
        "/dead-letters?status=any",
        f"/dead-letters/{letter}",
        "/refunds",
        f"/refunds/{refund_id}",
        "/reconciliation",
        f"/reconciliation/{run_id}",
        "/schedules",
    ]
    hashes = [entry.split(":", 2)[2] for entry in console_users.split(",")]
    for path in pages:
        response = client.get(path)
        html = response.get_data(True)
        assert response.status_code == 200, path
        for value in [*secrets_.values(), "signature_never_shown", *hashes]:
            assert value not in html, (path, value)
        assert "publickey" not in html, path
