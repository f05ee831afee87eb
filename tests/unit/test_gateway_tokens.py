"""Development signing keys and tokens, the `tessera token mint` command and the error catalogue."""

from __future__ import annotations

import json
import stat

import jwt
import pytest
from jwt import PyJWKSet

from tessera_gateway import errors, tokens
from tessera_runtime import cli


def test_keys_are_made_once_private_and_published_as_jwks(tmp_path):
    folder = tmp_path / "keys"
    first = tokens.ensure_keys(folder)
    again = tokens.ensure_keys(folder)
    assert first == again
    assert stat.S_IMODE((folder / tokens.KEY_FILE).stat().st_mode) == 0o600
    jwks = json.loads((folder / tokens.JWKS_FILE).read_text())
    assert [k["kid"] for k in jwks["keys"]] == [first.kid]
    assert "d" not in jwks["keys"][0]  # public half only


def test_a_minted_token_verifies_against_the_jwks(tmp_path):
    key = tokens.ensure_keys(tmp_path)
    token = tokens.mint(key, subject="u-1", scopes=["user:read", "order:write"], issuer="https://iss.example",
                        audience="api", ttl_seconds=120, now=1_000_000)
    public = PyJWKSet.from_dict(json.loads((tmp_path / tokens.JWKS_FILE).read_text()))[key.kid]
    claims = jwt.decode(token, public.key, algorithms=["RS256"], audience="api", issuer="https://iss.example",
                        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False})
    assert claims["sub"] == "u-1" and claims["scope"] == "user:read order:write"
    assert claims["exp"] - claims["iat"] == 120
    assert jwt.get_unverified_header(token)["kid"] == key.kid


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("12h", 43200),
                                                ("1d", 86400)])
def test_ttl_forms(text, seconds):
    assert tokens.parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5", "1w", "abc", "1.5h"])
def test_bad_ttls_are_refused(text):
    with pytest.raises(ValueError, match="ttl must be"):
        tokens.parse_ttl(text)


def test_token_mint_command(tmp_path, capsys):
    assert cli.main(["token", "mint", "--sub", "abc", "--scope", "user:read order:write", "--ttl", "10m",
                     "--keys", str(tmp_path)]) == 0
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "abc" and claims["scope"] == "user:read order:write"
    assert claims["aud"] == "tessera-api" and claims["exp"] - claims["iat"] == 600


def test_token_mint_mints_the_canary_scope(tmp_path, capsys):
    # A tester's token: its canary header reaches the services (the gateway removes it from every other token's).
    assert cli.main(["token", "mint", "--sub", "tester", "--scope", "user:read canary", "--keys", str(tmp_path)]) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), options={"verify_signature": False})
    assert claims["scope"] == "user:read canary"


@pytest.mark.parametrize(("argv", "message"), [
    (["--scope", "user:readx"], "unknown scope 'user:readx'"),
    (["--ttl", "forever"], "ttl must be"),
    (["--profile", "prod"], "remote JWKS"),
    # The dev gateway refuses a token that lives longer than jwt.max_lifetime_seconds (1 day): none is minted.
    (["--ttl", "2d"], "--ttl 2d is longer than the dev gateway accepts (jwt.max_lifetime_seconds: 86400 s)"),
    (["--ttl", "86401"], "longer than the dev gateway accepts"),
    # The subject is the caller's identity: the gateway refuses a token without one.
    (["--sub", ""], "--sub must name the user the token acts for"),
    (["--sub", "  "], "--sub must name the user the token acts for"),
])
def test_token_mint_refuses_bad_input(tmp_path, capsys, argv, message):
    assert cli.main(["token", "mint", "--sub", "abc", "--keys", str(tmp_path), *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""


def test_token_mint_accepts_the_longest_lifetime_the_gateway_does(tmp_path, capsys):
    assert cli.main(["token", "mint", "--sub", "abc", "--ttl", "1d", "--keys", str(tmp_path)]) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 86400


def test_token_mint_names_a_keys_folder_it_cannot_use(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["token", "mint", "--sub", "abc", "--keys", str(blocker / "keys")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tessera token: cannot use the key folder {blocker / 'keys'}: ")
    assert len(err.strip().splitlines()) == 1


def test_error_catalogue_maps_every_reason_to_a_code_and_status():
    for e in errors.GATEWAY_ERRORS:
        assert e.code in errors.CODES
        assert 400 <= e.http_status < 600
    assert errors.code_of_http_status(418) == "INVALID_ARGUMENT"
    assert errors.code_of_http_status(599) == "UNKNOWN"
    assert "`RATE_LIMITED`" in errors.markdown_table()
