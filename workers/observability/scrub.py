"""What may leave for Sentry: every event is walked and stripped of secrets and personal data.

Three nets, each enough on its own for what it knows: task arguments and stack-frame locals are
removed wherever the SDK puts them; a value under a key that names a secret or a personal
field (``*secret*``, ``*key*``, ``authorization``, ``card``, ``vpa``, ``phone``, ``email``...)
is replaced; and every string is searched for the configured secrets' values and for what looks
like a card number, an email address, a UPI id or a phone number, wherever it sits (exception
messages, log lines, breadcrumbs, source lines).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr

from config import Settings

FILTERED = "[Filtered]"

# Key names, split into words (snake, kebab, dotted and camel case): a key with any of these
# words, or containing any of the fragments, has its value replaced.
DENY_WORDS = frozenset(
    {
        "auth",
        "authorization",
        "bearer",
        "card",
        "cardnumber",
        "cookie",
        "credential",
        "credentials",
        "csrf",
        "cvc",
        "cvv",
        "dsn",
        "email",
        "key",
        "mobile",
        "msisdn",
        "pan",
        "passwd",
        "password",
        "phone",
        "pwd",
        "recipient",
        "secret",
        "session",
        "signature",
        "sig",
        "token",
        "upi",
        "vpa",
    }
)
DENY_EXACT = frozenset({"db.params", "body", "headers"})
DENY_FRAGMENTS = ("secret", "passw", "token", "apikey", "privatekey", "signature", "email", "phone")
# Keys with "key" in their names that are not secrets and help in debugging.
ALLOWED_KEYS = frozenset({"idempotency_key", "dedupe_key", "routing_key", "public_key"})

# Sentry's own bookkeeping, left as it is: ids, the SDK's description, the trace header.
STRUCTURAL = frozenset(
    {
        "event_id",
        "trace_id",
        "span_id",
        "parent_span_id",
        "segment_id",
        "task_id",
        "celery_task_id",
        "check_in_id",
        "sdk",
        "modules",
        "dynamic_sampling_context",
        "timestamp",
        "start_timestamp",
    }
)

# Where the SDK puts task arguments, locals and request bodies: removed outright.
TASK_ARGUMENT_KEYS = ("args", "kwargs")

_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# A UPI virtual payment address: name@handle, the handle without a dot (okaxis, ybl, paytm).
VPA = re.compile(r"(?<![\w.@-])[A-Za-z0-9][A-Za-z0-9._-]{1,255}@[A-Za-z][A-Za-z0-9]{1,63}\b")
# Card numbers, 13 to 19 digits: bare, in groups of four (4-6-5 for Amex) split by spaces or
# dashes, and last any other split of that many digits.
CARDS = (
    re.compile(r"(?<![\w])\d{13,19}(?![\w])"),
    re.compile(r"(?<![\w])\d{4}([ -])\d{4}\1\d{4}\1\d{1,4}(?:\1\d{1,3})?(?![\w])"),
    re.compile(r"(?<![\w])\d{4}([ -])\d{6}\1\d{4,5}(?![\w])"),
    re.compile(r"(?<![\w])(?:\d[ -]?){12,18}\d(?![\w])"),
)
# Phone numbers: an international number with its +, a bare run of 10 to 12 digits (an Indian
# mobile with or without 0/91), or grouped like 98765 43210 or 555-123-4567.
PHONE = re.compile(
    r"\+\d[\d ()-]{6,18}\d"
    r"|(?<![\w])\d{10,12}(?![\w])"
    r"|(?<![\w])\d{5}[ -]\d{5}(?![\w])"
    r"|(?<![\w])\(?\d{3}\)?[ -]\d{3}[ -]\d{4}(?![\w])"
)
# Secrets by shape, whether configured here or not: gateway keys, credentials in URLs,
# HTTP authorization values.
SECRET_SHAPES = re.compile(
    r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{6,}"
    r"|\bwhsec_[A-Za-z0-9]{6,}"
    r"|\brzp_(?:live|test)_[A-Za-z0-9]{6,}"
    r"|\b(?:Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{8,}"
)
URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<password>[^@\s/]+)(?=@)")

# A number this long outside an id field is treated like a card or phone number.
LONG_NUMBER = 10**9


def is_denied_key(key: str) -> bool:
    lowered = key.lower()
    if lowered in ALLOWED_KEYS:
        return False
    if lowered in DENY_EXACT:
        return True
    if any(fragment in lowered.replace("_", "").replace("-", "") for fragment in DENY_FRAGMENTS):
        return True
    return any(word.lower() in DENY_WORDS for word in _WORD.findall(key))


def configured_secrets(settings: Settings) -> list[str]:
    """Every secret value the settings hold: SecretStr settings (and the password part of
    `user:password` ones), and the passwords in the database and broker URLs."""
    found: list[str] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            secret = value.get_secret_value()
            found.append(secret)
            if ":" in secret and "://" not in secret:
                found.append(secret.split(":", 1)[1])
            found += _url_password(secret)
    for url in (settings.DATABASE_URL, settings.BROKER_URL):
        found += _url_password(url)
    # Longest first, so a secret that contains another is replaced whole.
    return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


def _url_password(url: str) -> list[str]:
    try:
        password = urlsplit(url).password
    except ValueError:
        return []
    return [password, unquote(password)] if password else []


class Scrubber:
    """`before_send` and `before_send_transaction` for sentry_sdk.init."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = [s for s in secrets if s]

    def __call__(self, event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any] | None:
        _strip_known_places(event)
        return self.clean(event)  # type: ignore[no-any-return]

    def clean(self, value: Any, key: str | None = None) -> Any:
        if isinstance(value, dict):
            return {k: self._clean_item(k, v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.clean(item, key) for item in value]
        if isinstance(value, str):
            return value if key in STRUCTURAL else self.text(value)
        if isinstance(value, int) and not isinstance(value, bool):
            id_like = key is not None and (key.lower() == "id" or key.lower().endswith("id"))
            return FILTERED if abs(value) >= LONG_NUMBER and not id_like else value
        return value

    def _clean_item(self, key: Any, value: Any) -> Any:
        if not isinstance(key, str):
            return self.clean(value)
        if key in STRUCTURAL:
            return value
        if is_denied_key(key) and value not in (None, "", [], {}):
            return FILTERED
        return self.clean(value, key)

    def text(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, FILTERED)
        text = URL_PASSWORD.sub(lambda m: m.group("head") + FILTERED, text)
        text = SECRET_SHAPES.sub(FILTERED, text)
        text = EMAIL.sub("[Filtered email]", text)
        text = VPA.sub("[Filtered vpa]", text)
        for card in CARDS:
            text = card.sub("[Filtered card]", text)
        return PHONE.sub("[Filtered phone]", text)


def _strip_known_places(event: dict[str, Any]) -> None:
    """Remove what is never sent whatever its content: the user, request bodies and cookies,
    task arguments, and the local variables of every stack frame."""
    event.pop("user", None)
    request = event.get("request")
    if isinstance(request, dict):
        for name in ("data", "cookies", "query_string", "env"):
            request.pop(name, None)
    extra = event.get("extra")
    if isinstance(extra, dict):
        for name in TASK_ARGUMENT_KEYS:
            extra.pop(name, None)
        job = extra.get("celery-job")
        if isinstance(job, dict):
            extra["celery-job"] = {"task_name": job.get("task_name")}
    for frame in _frames(event):
        frame.pop("vars", None)


def _frames(event: dict[str, Any]) -> Iterable[dict[str, Any]]:
    for section in ("exception", "threads"):
        container = event.get(section)
        values = container.get("values") if isinstance(container, dict) else None
        for entry in values or []:
            stacktrace = entry.get("stacktrace") if isinstance(entry, dict) else None
            frames = stacktrace.get("frames") if isinstance(stacktrace, dict) else None
            yield from (frame for frame in frames or [] if isinstance(frame, dict))
    stacktrace = event.get("stacktrace")
    if isinstance(stacktrace, dict):
        yield from (f for f in stacktrace.get("frames") or [] if isinstance(f, dict))
