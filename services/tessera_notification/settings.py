"""Settings of the notification service: messaging (see tessera_runtime.messaging) and where e-mail goes."""

from __future__ import annotations

import dataclasses
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from tessera_notification.adapters.mail import SmtpSettings
from tessera_runtime.config import DEFAULT_DATA_DIR, ConfigError, Env
from tessera_runtime.messaging import MessagingServiceSettings, MessagingSettings


@dataclasses.dataclass(frozen=True)
class MailSettings:
    """SMTP when TESSERA_SMTP_HOST is set; otherwise .eml files in TESSERA_MAIL_DIR (default <data dir>/mail)."""

    sender: str
    mail_dir: Path
    smtp: SmtpSettings | None
    # How long one delivery attempt may hold a notification before another delivery may try it.
    lease_seconds: float

    @property
    def mail_domain(self) -> str:
        return parseaddr(self.sender)[1].rpartition("@")[2] or "tessera.local"

    @classmethod
    def from_env(cls, env: Env) -> MailSettings:
        sender = env.str("TESSERA_MAIL_FROM", "Tessera <no-reply@tessera.dev>")
        if "@" not in parseaddr(sender)[1]:
            raise ConfigError(f"TESSERA_MAIL_FROM must be an e-mail address such as 'Shop <no-reply@shop.example>', "
                              f"got {sender!r}")
        data_dir = Path(env.str("TESSERA_DATA_DIR", str(DEFAULT_DATA_DIR)))
        mail_dir = Path(env.str("TESSERA_MAIL_DIR", str(data_dir / "mail")))
        smtp = None
        host = env.optional_str("TESSERA_SMTP_HOST")
        if host is not None:
            starttls = env.bool("TESSERA_SMTP_STARTTLS", True)
            username = env.optional_str("TESSERA_SMTP_USERNAME")
            password = env.optional_str("TESSERA_SMTP_PASSWORD")
            if password is not None and username is None:
                raise ConfigError("TESSERA_SMTP_PASSWORD is set but TESSERA_SMTP_USERNAME is not")
            if username is not None and password is None:
                raise ConfigError("TESSERA_SMTP_USERNAME is set but TESSERA_SMTP_PASSWORD is not")
            ca_file = env.optional_str("TESSERA_SMTP_CA_FILE")
            if ca_file is not None and not Path(ca_file).is_file():
                raise ConfigError(f"TESSERA_SMTP_CA_FILE must name a readable file, got {ca_file!r}")
            smtp = SmtpSettings(
                host=host, port=env.int("TESSERA_SMTP_PORT", 587 if starttls else 25, minimum=1, maximum=65535),
                username=username, password=password, starttls=starttls, ca_file=ca_file,
                timeout_seconds=env.float("TESSERA_SMTP_TIMEOUT_SECONDS", 30.0, minimum=0.1),
            )
        timeout = smtp.timeout_seconds if smtp is not None else 30.0
        lease = env.float("TESSERA_NOTIFICATION_LEASE_SECONDS", max(120.0, 2 * timeout), minimum=1.0)
        if lease <= timeout:
            raise ConfigError(f"TESSERA_NOTIFICATION_LEASE_SECONDS must exceed TESSERA_SMTP_TIMEOUT_SECONDS "
                              f"({timeout}), got {lease}")
        return cls(sender=sender, mail_dir=mail_dir, smtp=smtp, lease_seconds=lease)


@dataclasses.dataclass(frozen=True)
class NotificationSettings(MessagingServiceSettings):
    mail: MailSettings

    @classmethod
    def extra_from_env(cls, env: Env) -> dict[str, Any]:
        return {"messaging": MessagingSettings.from_env(env), "mail": MailSettings.from_env(env)}
