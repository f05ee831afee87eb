"""The mail adapters against a real SMTP server (STARTTLS, AUTH, refusals) and a real folder."""

from __future__ import annotations

import email
import email.policy

import pytest

from tessera_notification.adapters.mail import (
    FileMailer,
    OutgoingMail,
    PermanentMailError,
    SmtpMailer,
    SmtpSettings,
    TransientMailError,
)
from tests.support.smtp import SmtpSink

SENDER = "Tessera <no-reply@tessera.dev>"
MAIL = OutgoingMail(message_id="<n-1@tessera.dev>", to_address="ada@example.com", to_name="Ada Lovelace",
                    subject="Welcome to Tessera, Ada Lovelace", body="Hello Ada,\n\nwelcome.\n",
                    headers=(("X-Tessera-Notification-Id", "n-1"),))


@pytest.fixture
async def secure_smtp(tmp_path):
    sink = await SmtpSink(tls_folder=tmp_path, username="tessera", password="s3cret").start()
    yield sink
    await sink.stop()


def settings(sink: SmtpSink, **overrides) -> SmtpSettings:
    values = dict(host="127.0.0.1", port=sink.port, username="tessera", password="s3cret", starttls=True,
                  ca_file=str(sink.cert_file), timeout_seconds=5.0)
    values.update(overrides)
    return SmtpSettings(**values)


async def test_sends_over_starttls_with_authentication(secure_smtp):
    await SmtpMailer(settings(secure_smtp), SENDER).send(MAIL)
    [message] = secure_smtp.messages
    assert message["From"] == SENDER and message["To"] == "Ada Lovelace <ada@example.com>"
    assert message["Subject"] == MAIL.subject and message["Message-ID"] == "<n-1@tessera.dev>"
    assert message["X-Tessera-Notification-Id"] == "n-1" and message["Date"]
    assert message.get_content() == MAIL.body


@pytest.mark.parametrize("change", [
    {"password": "wrong"},  # AUTH refused: a setting, retried (then dead-lettered) rather than dropped
    {"ca_file": None},  # the server's certificate is not trusted
    {"starttls": False},  # this server requires STARTTLS
    {"port": 1},  # nobody listens
])
async def test_configuration_and_connection_problems_are_transient(secure_smtp, change, caplog):
    with pytest.raises(TransientMailError) as err:
        await SmtpMailer(settings(secure_smtp, **change), SENDER).send(MAIL)
    assert secure_smtp.messages == []
    # The error becomes the notification's last_error, which its recipient reads: no host, port or address in it.
    assert "127.0.0.1" not in str(err.value) and str(settings(secure_smtp, **change).port) not in str(err.value)


async def test_a_refused_recipient_is_permanent_for_5xx_and_transient_for_4xx(secure_smtp):
    mailer = SmtpMailer(settings(secure_smtp), SENDER)
    secure_smtp.refuse["ada@example.com"] = (550, "5.1.1 no such user")
    with pytest.raises(PermanentMailError, match=r"550 5\.1\.1 no such user"):
        await mailer.send(MAIL)
    secure_smtp.refuse["ada@example.com"] = (451, "4.2.0 try later")
    with pytest.raises(TransientMailError, match="451"):
        await mailer.send(MAIL)
    assert secure_smtp.messages == []


async def test_file_mailer_writes_one_eml_per_message(tmp_path):
    folder = tmp_path / "mail"
    await FileMailer(folder, SENDER).send(MAIL)
    [written] = list(folder.iterdir())
    assert written.suffix == ".eml" and "n-1" in written.name
    message = email.message_from_bytes(written.read_bytes(), policy=email.policy.default)
    assert message["Subject"] == MAIL.subject and message.get_content() == MAIL.body


async def test_file_mailer_cannot_write_is_transient(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(TransientMailError) as err:
        await FileMailer(blocker, SENDER).send(MAIL)
    # The error becomes the notification's last_error, which its recipient reads: the path is only logged.
    assert str(err.value).startswith("the mail could not be written (") and str(tmp_path) not in str(err.value)
    assert any(getattr(r, "folder", None) == str(blocker) for r in caplog.records)


# A display name the user service accepts (printable, at most 100 characters) that is too long for one header line
# once quoted, and holds what reads as addresses and a header name when its quotes are lost.
LONG_NAME = "Ada Lovelace, Bcc: evil@attacker.example, Charles Babbage, the Difference Engine team"


async def test_a_long_display_name_stays_the_display_name_of_the_one_recipient(secure_smtp, tmp_path):
    name = LONG_NAME
    mail = OutgoingMail(message_id="<n-2@tessera.dev>", to_address="ada@example.com", to_name=name,
                        subject="Welcome", body="Hello\n")
    await SmtpMailer(settings(secure_smtp), SENDER).send(mail)
    folder = tmp_path / "mail"
    await FileMailer(folder, SENDER).send(mail)
    [written] = list(folder.iterdir())
    from_file = email.message_from_bytes(written.read_bytes(), policy=email.policy.default)
    for message in (secure_smtp.messages[0], from_file):
        addresses = message["To"].addresses
        assert [(a.display_name, a.addr_spec) for a in addresses] == [(name, "ada@example.com")]
        assert message["Bcc"] is None


# Printable, so the user service accepts it as a display name; decoded as an RFC 2047 encoded word it is
# "Ada\r\nBcc: evil@attacker.example".
ENCODED_BREAK = "=?utf-8?q?Ada=0D=0ABcc=3A_evil=40attacker=2Eexample?="


async def test_an_encoded_word_in_a_display_name_or_subject_adds_no_header(secure_smtp, tmp_path):
    mail = OutgoingMail(message_id="<n-3@tessera.dev>", to_address="ada@example.com", to_name=ENCODED_BREAK,
                        subject=f"Welcome to Tessera, {ENCODED_BREAK}", body="Hello\n")
    await SmtpMailer(settings(secure_smtp), SENDER).send(mail)
    folder = tmp_path / "mail"
    await FileMailer(folder, SENDER).send(mail)
    [written] = list(folder.iterdir())
    from_file = email.message_from_bytes(written.read_bytes(), policy=email.policy.default)
    for message in (secure_smtp.messages[0], from_file):
        assert sorted(message.keys()) == ["Content-Transfer-Encoding", "Content-Type", "Date", "From", "MIME-Version",
                                          "Message-ID", "Subject", "To"]
        assert [a.addr_spec for a in message["To"].addresses] == ["ada@example.com"]
        assert message["Subject"].startswith("Welcome to Tessera, ")
        assert message.get_content() == "Hello\n"
