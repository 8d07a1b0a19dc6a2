"""The delivery channels: email over SMTP, SMS and push through HTTP providers.

Each `send` either returns the provider's reference for the message or raises one of:
`DeliveryTransient` (nothing was accepted; a later attempt may succeed: connection errors,
timeouts, SMTP 4xx, HTTP 408/425/429/5xx), `DeliveryPermanent` (the provider refused this
message for good: SMTP 5xx, HTTP 4xx, a channel left unconfigured) or, for push,
`TokenUnregistered` (the provider no longer knows the device token).

The HTTP providers' contract (docs/notifications.md): `POST {base}/sms` with
`{"to", "body"}`, `POST {base}/push` with `{"token", "title", "body", "data"}`, a bearer API
key and an `Idempotency-Key` header that stays the same for every attempt of one
notification; 2xx answers `{"id": ...}`. A push token the provider no longer knows is HTTP 404
or 410, or any answer whose JSON `error` is `Unregistered` or `NotRegistered` (FCM's words).
"""

from __future__ import annotations

import email.utils
import re
import smtplib
import socket
import ssl
import threading
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import requests

from config import Settings, get_settings
from workers.errors import PermanentError, TransientError, one_line


class DeliveryTransient(TransientError):
    """The provider did not take the message this time (busy, down, unreachable)."""


class DeliveryPermanent(PermanentError):
    """The provider refused the message; sending it again cannot help."""


class RecipientRejected(DeliveryPermanent):
    """The provider says the recipient does not exist or cannot receive (SMTP 5xx on RCPT)."""


class ChannelNotConfigured(DeliveryPermanent):
    """A setting the channel needs is unset; set it and replay the notification."""


class TokenUnregistered(DeliveryPermanent):
    """The push provider no longer knows this device token: it is marked invalid."""

    def __init__(self, token: str, message: str) -> None:
        super().__init__(message)
        self.token = token


class NoPushToken(DeliveryPermanent):
    """The recipient has no valid push token (none registered, or all marked invalid)."""


@dataclass(frozen=True)
class Message:
    """One rendered notification on its way to a provider."""

    notification_id: int
    recipient: str  # an address, a phone number or one device token
    subject: str
    body: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def idempotency_key(self) -> str:
        # The same for every attempt: a provider that honours it sends a retried message once.
        return f"backstop-notification-{self.notification_id}"


def mask(recipient: str) -> str:
    """What logs show of a recipient: enough to tell two apart, not enough to contact one."""
    if "@" in recipient:
        local, _, domain = recipient.partition("@")
        return f"{local[:1]}***@{domain}"
    if recipient.startswith("user:"):
        return recipient
    if recipient.startswith("+"):
        return recipient[:3] + "*" * max(len(recipient) - 5, 0) + recipient[-2:]
    return recipient[:6] + "..."


ADDRESSES = re.compile(r"[^\s<>@'\"]+@[^\s<>@'\"]+|\+[0-9]{7,15}")


def scrub(text: str) -> str:
    """An error for the logs with every address and phone number in it masked (an SMTP server
    often repeats the recipient in its refusal)."""
    return ADDRESSES.sub(lambda found: mask(found.group()), text)


# -- email ----------------------------------------------------------------------------------------


class EmailChannel:
    """Email over SMTP with the standard library. A connection is kept and reused for the next
    message (one per worker process and thread); a broken one is dropped and opened anew."""

    name = "email"

    def __init__(
        self,
        host: str | None,
        port: int,
        *,
        sender: str,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = True,
        timeout: float = 10.0,
    ) -> None:
        self.host, self.port, self.sender = host, port, sender
        self.username, self.password = username, password
        self.starttls, self.timeout = starttls, timeout
        self._smtp: smtplib.SMTP | None = None

    def send(self, message: Message) -> str:
        if not self.host:
            raise ChannelNotConfigured("email is not configured: SMTP_HOST is not set")
        mail = EmailMessage()
        mail["From"] = self.sender
        mail["To"] = message.recipient
        mail["Subject"] = " ".join(message.subject.split())  # no header injection
        mail["Date"] = email.utils.formatdate(usegmt=True)
        domain = self.sender.rpartition("@")[2] or "backstop"
        message_id = f"<{message.idempotency_key}@{domain}>"
        mail["Message-ID"] = message_id
        mail.set_content(message.body)
        try:
            # A kept connection may have been closed by the server since: one fresh retry.
            for fresh in (self._smtp is None, True):
                smtp = self._connect()
                try:
                    smtp.send_message(mail)
                    return message_id
                except smtplib.SMTPServerDisconnected:
                    self.close()
                    if fresh:
                        raise
        except smtplib.SMTPRecipientsRefused as refused:
            self._reset()
            code, reply = next(iter(refused.recipients.values()))
            raise _smtp_error(code, reply, "recipient refused", recipient=True) from None
        except smtplib.SMTPResponseException as error:
            self._reset()
            raise _smtp_error(error.smtp_code, error.smtp_error, type(error).__name__) from None
        except smtplib.SMTPNotSupportedError as error:
            self.close()
            raise DeliveryPermanent(f"SMTP server: {one_line(error)}") from None
        except ssl.SSLCertVerificationError as error:
            self.close()
            raise DeliveryPermanent(f"SMTP TLS certificate: {one_line(error)}") from None
        except (smtplib.SMTPException, OSError) as error:  # refused, reset, timed out, TLS
            self.close()
            raise DeliveryTransient(f"SMTP {type(error).__name__}: {one_line(error)}") from None
        raise AssertionError("unreachable")

    def _connect(self) -> smtplib.SMTP:
        if self._smtp is not None:
            return self._smtp
        smtp = smtplib.SMTP(self.host or "", self.port, timeout=self.timeout)
        try:
            smtp.ehlo()
            if self.starttls:
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if self.username and self.password:
                smtp.login(self.username, self.password)
        except BaseException:
            _quietly_close(smtp)
            raise
        self._smtp = smtp
        return smtp

    def _reset(self) -> None:
        """After a refusal the transaction is reset so the connection can be reused."""
        if self._smtp is not None:
            try:
                self._smtp.rset()
            except (smtplib.SMTPException, OSError):
                self.close()

    def close(self) -> None:
        if self._smtp is not None:
            _quietly_close(self._smtp)
            self._smtp = None


def _quietly_close(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()


def _smtp_error(
    code: int, reply: bytes | str, what: str, *, recipient: bool = False
) -> DeliveryPermanent | DeliveryTransient:
    text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
    message = f"SMTP {code} {what}: {' '.join(text.split())}"
    if 500 <= code < 600:
        return RecipientRejected(message) if recipient else DeliveryPermanent(message)
    return DeliveryTransient(message)  # 4xx: try again later


# -- HTTP providers -------------------------------------------------------------------------------

TRANSIENT_HTTP = frozenset({408, 425, 429})
UNREGISTERED_ERRORS = frozenset({"Unregistered", "NotRegistered"})


class HttpChannel:
    """A provider reached with `requests`, one session (and its kept connections) per
    channel object, explicit connect and read timeouts on every call."""

    name = "http"
    path = "/"
    setting = "PROVIDER_URL"

    def __init__(self, base_url: str | None, api_key: str | None, *, timeout: float) -> None:
        self.base_url = base_url.rstrip("/") if base_url else None
        self.api_key, self.timeout = api_key, timeout
        self._session = requests.Session()

    def post(self, body: dict[str, Any], idempotency_key: str) -> tuple[int, dict[str, Any]]:
        if not self.base_url:
            raise ChannelNotConfigured(f"{self.name} is not configured: {self.setting} is not set")
        headers = {"Idempotency-Key": idempotency_key}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            response = self._session.post(
                self.base_url + self.path,
                json=body,
                headers=headers,
                timeout=(min(self.timeout, 5.0), self.timeout),
            )
        except requests.RequestException as error:  # connection refused or reset, timeouts
            raise DeliveryTransient(
                f"{self.name} provider: {type(error).__name__}: {_reason(error)}"
            ) from None
        try:
            answer = response.json()
        except ValueError:
            answer = {}
        return response.status_code, answer if isinstance(answer, dict) else {}

    def refusal(self, status: int, answer: dict[str, Any]) -> DeliveryTransient | DeliveryPermanent:
        error = str(answer.get("error") or answer.get("message") or "")[:200]
        text = f"{self.name} provider HTTP {status}" + (f": {error}" if error else "")
        if status in TRANSIENT_HTTP or status >= 500:
            return DeliveryTransient(text)
        return DeliveryPermanent(text)

    def close(self) -> None:
        self._session.close()


def _reason(error: Exception) -> str:
    # requests' messages name the whole URL and a pool object; the exception class and the
    # innermost reason say what happened.
    inner = error
    while inner.__context__ is not None and inner.__context__ is not inner:
        inner = inner.__context__  # type: ignore[assignment]
    if isinstance(inner, socket.timeout | TimeoutError):
        return "timed out"
    return one_line(inner)[:200]


class SmsChannel(HttpChannel):
    name = "sms"
    path = "/sms"
    setting = "SMS_PROVIDER_URL"

    def send(self, message: Message) -> str:
        text = f"{message.subject}: {message.body}" if message.subject else message.body
        status, answer = self.post({"to": message.recipient, "body": text}, message.idempotency_key)
        if 200 <= status < 300:
            return str(answer.get("id") or "")
        raise self.refusal(status, answer)


class PushChannel(HttpChannel):
    name = "push"
    path = "/push"
    setting = "PUSH_PROVIDER_URL"

    def send(self, message: Message) -> str:
        body = {
            "token": message.recipient,
            "title": message.subject,
            "body": message.body,
            "data": message.data,
        }
        # One key per device: a user's devices are separate messages at the provider.
        key = f"{message.idempotency_key}-{message.recipient[-16:]}"
        status, answer = self.post(body, key)
        if status in (404, 410) or answer.get("error") in UNREGISTERED_ERRORS:
            raise TokenUnregistered(
                message.recipient,
                f"push provider HTTP {status}: token {mask(message.recipient)} is unregistered",
            )
        if 200 <= status < 300:
            return str(answer.get("id") or "")
        raise self.refusal(status, answer)


@dataclass
class Channels:
    """The three channels one worker thread sends with."""

    email: EmailChannel
    sms: SmsChannel
    push: PushChannel

    def close(self) -> None:
        self.email.close()
        self.sms.close()
        self.push.close()


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


def channels_from(settings: Settings) -> Channels:
    timeout = settings.NOTIFY_TIMEOUT_SECONDS
    return Channels(
        email=EmailChannel(
            settings.SMTP_HOST,
            settings.SMTP_PORT,
            sender=settings.NOTIFY_EMAIL_FROM,
            username=settings.SMTP_USERNAME,
            password=_secret(settings.SMTP_PASSWORD),
            starttls=settings.SMTP_STARTTLS,
            timeout=timeout,
        ),
        sms=SmsChannel(
            settings.SMS_PROVIDER_URL, _secret(settings.SMS_PROVIDER_API_KEY), timeout=timeout
        ),
        push=PushChannel(
            settings.PUSH_PROVIDER_URL, _secret(settings.PUSH_PROVIDER_API_KEY), timeout=timeout
        ),
    )


_local = threading.local()


def get_channels() -> Channels:
    """This thread's channels, made from the settings on first use (an SMTP connection and
    an HTTP session are not to be shared between threads)."""
    channels = getattr(_local, "channels", None)
    if channels is None:
        channels = _local.channels = channels_from(get_settings())
    return channels
