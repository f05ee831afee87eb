"""Development signing keys and tokens: an RSA key made on first use in a git-ignored folder, its JWKS, RS256 JWTs.

Production tokens come from the identity provider named in the prod profile; nothing here is used there.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import time
import uuid
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

KEY_FILE = "signing-key.pem"
JWKS_FILE = "jwks.json"
_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclasses.dataclass(frozen=True)
class SigningKey:
    private_pem: bytes
    kid: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _kid(public_jwk: dict) -> str:
    """RFC 7638 thumbprint of the public key: stable for a key, different for every new one."""
    canonical = json.dumps({k: public_jwk[k] for k in ("e", "kty", "n")}, separators=(",", ":"), sort_keys=True)
    return _b64(hashlib.sha256(canonical.encode()).digest())


def _public_jwk(private_pem: bytes) -> dict:
    key = serialization.load_pem_private_key(private_pem, password=None)
    return json.loads(RSAAlgorithm.to_jwk(key.public_key()))


def write_jwks(folder: Path, private_pem: bytes) -> Path:
    jwk = _public_jwk(private_pem)
    jwk.update(kid=_kid(jwk), alg="RS256", use="sig")
    path = folder / JWKS_FILE
    path.write_text(json.dumps({"keys": [jwk]}, indent=2) + "\n")
    return path


def ensure_keys(folder: Path) -> SigningKey:
    """The signing key in folder, made (with its JWKS) when there is none yet."""
    key_path = folder / KEY_FILE
    if not key_path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        tmp = key_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        write_jwks(folder, pem)
        os.replace(tmp, key_path)
    pem = key_path.read_bytes()
    if not (folder / JWKS_FILE).exists():
        write_jwks(folder, pem)
    return SigningKey(private_pem=pem, kid=_kid(_public_jwk(pem)))


def parse_ttl(text: str) -> int:
    """Seconds from "3600", "90s", "30m", "12h" or "1d"."""
    m = _DURATION.match(text.strip())
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"ttl must be a positive number of seconds or like 30m, 12h, 1d; got {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def mint(key: SigningKey, *, subject: str, scopes: list[str] | tuple[str, ...], issuer: str, audience: str,
         ttl_seconds: int = 3600, now: float | None = None, extra_claims: dict | None = None) -> str:
    """An RS256 JWT for subject with a space-delimited scope claim."""
    issued = int(time.time() if now is None else now)
    claims = {
        "iss": issuer, "aud": audience, "sub": subject, "scope": " ".join(scopes),
        "iat": issued, "nbf": issued, "exp": issued + ttl_seconds, "jti": uuid.uuid4().hex,
        **(extra_claims or {}),
    }
    return jwt.encode(claims, key.private_pem, algorithm="RS256", headers={"kid": key.kid})
