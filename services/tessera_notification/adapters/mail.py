"""Sending e-mail: over SMTP (smtplib on a worker thread), or as .eml files in a folder (the `make run` default)."""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import datetime as dt
import email.policy
import email.utils
import logging
import os
import smtplib
import ssl
import uuid
from email.headerregistry import Address
from email.message import EmailMessage
from pathlib import Path

# A failure's text is kept on the notification (last_error), which its recipient reads: what names this system's
# hosts, addresses or paths is logged here instead, and the error says what failed in words of its own.
log = logging.getLogger("tessera.notification.mail")


class MailError(Exception):
    """Delivery failed."""


class TransientMailError(MailError):
    """The server was away, busy or refused for now (4xx), or a setting is wrong: worth retrying."""


class PermanentMailError(MailError):
    """The server refused this message for good (5xx for the recipient or the content): retrying cannot help."""


@dataclasses.dataclass(frozen=True)
class OutgoingMail:
    message_id: str  # RFC 5322 Message-ID, "<...>"
    to_address: str
    to_name: str
    subject: str
    body: str
    headers: tuple[tuple[str, str], ...] = ()


# Headers are written unfolded (RFC 5322 allows lines of up to 998 characters; ours stay far below): Python's
# folding of an address header splits a long quoted display name into bare words, so the To header would list
# whatever addresses the user's display name spells, or be unreadable.
_HEADERS_POLICY = email.policy.default.clone(max_line_length=998)


def _literal(text: str) -> str:
    """Header text that reads back as written: Python decodes RFC 2047 encoded words ("=?utf-8?q?...?=") in the
    text it is given, and one spelling a line break would write a header of its own (a Bcc, a second body). A
    zero-width space after every "=" of "=?" leaves the text as it looks, with no encoded word in it."""
    return text.replace("=?", "=\u200b?")


def build_message(mail: OutgoingMail, sender: str, now: dt.datetime | None = None) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = (Address(display_name=_literal(mail.to_name), addr_spec=mail.to_address) if mail.to_name
                     else mail.to_address)
    message["Subject"] = _literal(mail.subject)
    message["Date"] = email.utils.format_datetime(now or dt.datetime.now(dt.UTC))
    message["Message-ID"] = mail.message_id
    for name, value in mail.headers:
        message[name] = value
    message.set_content(mail.body)  # the body's encoding is chosen for the default 78-character lines
    message.policy = _HEADERS_POLICY
    return message


class Mailer(abc.ABC):
    @abc.abstractmethod
    async def send(self, mail: OutgoingMail) -> None:
        """Hands the message over; raises TransientMailError or PermanentMailError."""


class FileMailer(Mailer):
    """Writes each message as an .eml file (RFC 5322, readable by any mail client) into a folder."""

    def __init__(self, folder: Path, sender: str) -> None:
        self.folder = folder
        self.sender = sender

    async def send(self, mail: OutgoingMail) -> None:
        await asyncio.to_thread(self._write, mail)

    def _write(self, mail: OutgoingMail) -> None:
        now = dt.datetime.now(dt.UTC)
        data = build_message(mail, self.sender, now).as_bytes()
        name = f"{now.strftime('%Y%m%dT%H%M%S.%f')}-{mail.message_id.strip('<>').split('@')[0]}.eml"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            temporary = self.folder / f".{uuid.uuid4().hex}.tmp"
            temporary.write_bytes(data)
            os.replace(temporary, self.folder / name)  # readers never see half a file
        except OSError as exc:
            log.warning("cannot write the mail folder", extra={"folder": str(self.folder), "detail": str(exc)})
            raise TransientMailError(f"the mail could not be written ({type(exc).__name__})") from exc


@dataclasses.dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    username: str | None
    password: str | None
    starttls: bool
    ca_file: str | None
    timeout_seconds: float


class SmtpMailer(Mailer):
    """One SMTP session per message, on a worker thread (smtplib blocks): EHLO, STARTTLS when configured
    (certificate verified against the system's or TESSERA_SMTP_CA_FILE's authorities), AUTH when a username is
    set, then the message."""

    def __init__(self, settings: SmtpSettings, sender: str) -> None:
        self.settings = settings
        self.sender = sender

    async def send(self, mail: OutgoingMail) -> None:
        await asyncio.to_thread(self._send, build_message(mail, self.sender))

    def _tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.settings.ca_file)

    def _send(self, message: EmailMessage) -> None:
        s = self.settings
        try:
            with smtplib.SMTP(s.host, s.port, timeout=s.timeout_seconds) as smtp:
                smtp.ehlo()
                if s.starttls:
                    smtp.starttls(context=self._tls())
                    smtp.ehlo()
                if s.username:
                    smtp.login(s.username, s.password or "")
                smtp.send_message(message)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            detail = "; ".join(f"{code} {text.decode(errors='replace') if isinstance(text, bytes) else text}"
                               for code, text in exc.recipients.values())
            error = PermanentMailError if codes and all(500 <= c < 600 for c in codes) else TransientMailError
            raise error(f"recipient refused: {detail}") from exc
        except smtplib.SMTPDataError as exc:
            error = PermanentMailError if 500 <= exc.smtp_code < 600 else TransientMailError
            raise error(f"message refused: {exc.smtp_code} {_text(exc.smtp_error)}") from exc
        except smtplib.SMTPResponseException as exc:
            # Sender refused, authentication failed: the configuration, not this message. Retried, then
            # dead-lettered, so that nothing is lost while an operator fixes it.
            raise TransientMailError(f"SMTP error {exc.smtp_code} {_text(exc.smtp_error)}") from exc
        except (smtplib.SMTPException, OSError) as exc:
            log.warning("no session with the mail server", extra={
                "host": s.host, "port": s.port, "detail": f"{type(exc).__name__}: {exc}"})
            raise TransientMailError(f"the mail server could not be reached ({type(exc).__name__})") from exc


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
