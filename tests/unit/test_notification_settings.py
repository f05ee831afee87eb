"""Where the notification service sends mail, and the settings it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from tessera_notification.settings import MailSettings, NotificationSettings
from tessera_runtime.config import ConfigError, Env


def test_without_an_smtp_host_mail_goes_to_eml_files_in_the_data_folder(tmp_path):
    mail = MailSettings.from_env(Env({"TESSERA_DATA_DIR": str(tmp_path)}))
    assert mail.smtp is None and mail.mail_dir == tmp_path / "mail"
    assert mail.mail_domain == "tessera.dev"


def test_smtp_settings_default_to_starttls_on_the_submission_port():
    mail = MailSettings.from_env(Env({"TESSERA_SMTP_HOST": "mail.example.com", "TESSERA_SMTP_USERNAME": "shop",
                                      "TESSERA_SMTP_PASSWORD": "pw", "TESSERA_MAIL_FROM": "Shop <hi@shop.example>"}))
    assert (mail.smtp.host, mail.smtp.port, mail.smtp.starttls) == ("mail.example.com", 587, True)
    assert (mail.smtp.username, mail.smtp.password, mail.mail_domain) == ("shop", "pw", "shop.example")
    plain = MailSettings.from_env(Env({"TESSERA_SMTP_HOST": "localhost", "TESSERA_SMTP_STARTTLS": "false"}))
    assert plain.smtp.port == 25


@pytest.mark.parametrize(("env", "variable"), [
    ({"TESSERA_MAIL_FROM": "nobody"}, "TESSERA_MAIL_FROM"),
    ({"TESSERA_SMTP_HOST": "h", "TESSERA_SMTP_PASSWORD": "pw"}, "TESSERA_SMTP_PASSWORD"),
    ({"TESSERA_SMTP_HOST": "h", "TESSERA_SMTP_USERNAME": "u"}, "TESSERA_SMTP_USERNAME"),
    ({"TESSERA_SMTP_HOST": "h", "TESSERA_SMTP_PORT": "0"}, "TESSERA_SMTP_PORT"),
    ({"TESSERA_SMTP_HOST": "h", "TESSERA_SMTP_CA_FILE": "/no/such/file"}, "TESSERA_SMTP_CA_FILE"),
    ({"TESSERA_SMTP_HOST": "h", "TESSERA_SMTP_TIMEOUT_SECONDS": "60",
      "TESSERA_NOTIFICATION_LEASE_SECONDS": "30"}, "TESSERA_NOTIFICATION_LEASE_SECONDS"),
])
def test_a_bad_mail_setting_names_its_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        MailSettings.from_env(Env(env))


def test_the_service_settings_carry_messaging_and_mail(tmp_path: Path):
    settings = NotificationSettings.from_env("notification", 50055, {"TESSERA_DATA_DIR": str(tmp_path),
                                                                     "TESSERA_CONSUMER_MAX_ATTEMPTS": "2"})
    assert settings.grpc_port == 50055 and settings.messaging.consumer_max_attempts == 2
    assert settings.mail.mail_dir == tmp_path / "mail"
