"""The generated bootstrap is accepted by the real Envoy (`envoy --mode validate`) for every profile and value set."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tessera_gateway import generate, process
from tests.support.processes import ROOT


def _validate(path) -> None:
    result = process.validate(path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK" in result.stdout + result.stderr


@pytest.mark.parametrize(("profile", "suffix"), [("dev", "yaml"), ("prod", "json")])
def test_cli_writes_a_config_envoy_accepts(profile, suffix, tmp_path):
    out = tmp_path / f"envoy-{profile}.{suffix}"
    values = tmp_path / "values.yaml"
    # The dev profile's JWKS file is made on first use; point it into the test's folder.
    values.write_text(f"jwt: {{jwks_file: {tmp_path / 'keys' / 'jwks.json'}}}\n" if profile == "dev" else "{}\n")
    result = subprocess.run([sys.executable, "-m", "tessera_gateway.generate", "--profile", profile, "--out", str(out),
                             "--values", str(values)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{profile} profile" in result.stdout
    if profile == "dev":
        assert (tmp_path / "keys" / "jwks.json").exists() and (tmp_path / "keys" / "signing-key.pem").exists()
    _validate(out)


def _self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api.tessera.example.com")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_prod_with_a_tls_listener_is_accepted(tmp_path):
    cert, key = _self_signed(tmp_path)
    generated = generate.generate("prod", {"tls": {"cert_file": str(cert), "key_file": str(key)}})
    listener = generated.config.listener()
    assert listener.filter_chains[0].transport_socket is not None
    _validate(generate.write(generated, tmp_path / "envoy-tls.yaml"))


def test_a_missing_certificate_is_refused_by_envoy(tmp_path):
    generated = generate.generate("prod", {"tls": {"cert_file": str(tmp_path / "none.crt"),
                                                   "key_file": str(tmp_path / "none.key")}})
    result = process.validate(generate.write(generated, tmp_path / "envoy-broken.yaml"))
    assert result.returncode != 0
