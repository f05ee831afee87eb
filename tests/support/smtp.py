"""A real SMTP server for tests (aiosmtpd on the test's event loop, port 0) that keeps what it receives.

It can refuse chosen recipients (4xx: retried, 5xx: refused for good), hold a message before answering DATA
(to act while the sender waits for the reply), and require STARTTLS and AUTH with a self-signed certificate.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import time
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


class SmtpSink:
    def __init__(self, *, tls_folder: Path | None = None, username: str | None = None,
                 password: str | None = None) -> None:
        self.messages: list[EmailMessage] = []
        # Recipient address → (code, text) answered to RCPT TO.
        self.refuse: dict[str, tuple[int, str]] = {}
        self.hold: asyncio.Event | None = None  # when set to an unset Event, DATA waits for it
        self.held = asyncio.Event()  # set when a message is being held
        self.cert_file: Path | None = None
        self._tls: ssl.SSLContext | None = None
        self._credentials = (username, password)
        if tls_folder is not None:
            self.cert_file, key_file = _self_signed(tls_folder)
            self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls.load_cert_chain(self.cert_file, key_file)
        self.port = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> SmtpSink:
        loop = asyncio.get_running_loop()
        auth = self._credentials[0] is not None

        def protocol() -> SMTP:
            return SMTP(self, hostname="127.0.0.1", tls_context=self._tls, require_starttls=self._tls is not None,
                        authenticator=self._authenticate if auth else None, auth_required=auth,
                        auth_require_tls=True)

        self._server = await loop.create_server(protocol, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword)
              and (auth_data.login.decode(), auth_data.password.decode()) == self._credentials)
        return AuthResult(success=ok, handled=False)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:
        refused = self.refuse.get(address)
        if refused is not None:
            return f"{refused[0]} {refused[1]}"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:
        if self.hold is not None and not self.hold.is_set():
            self.held.set()
            await self.hold.wait()
        message = message_from_bytes(envelope.content.replace(b"\r\n", b"\n"), policy=policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append(message)
        return "250 Message accepted"

    def to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.messages if m["To"].addresses[0].addr_spec == address]

    async def wait_for(self, count: int, timeout: float = 30.0, address: str | None = None) -> list[EmailMessage]:
        """Waits until at least `count` messages (to `address`, when given) arrived."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.to(address) if address is not None else self.messages
            if len(got) >= count:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(got)} e-mails arrived, expected {count}")
            await asyncio.sleep(0.05)


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "smtp-cert.pem", folder / "smtp-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file
