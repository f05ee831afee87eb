"""Authentication and authorisation at the edge, over REST and native gRPC, against the real user service."""

from __future__ import annotations

import time
import uuid

import jwt
import pytest

from tessera_gateway import tokens
from tests.support.gateway import unique, user_gateway

GET_USER = "tessera.user.v1.UserService/GetUser"
LIST_USERS = "tessera.user.v1.UserService/ListUsers"
# grpcurl exits with 64 + the gRPC status code.
OK, PERMISSION_DENIED, UNAUTHENTICATED = 0, 64 + 7, 64 + 16


@pytest.fixture(scope="module")
def accounts(gateway):
    admin = gateway.mint(unique("auth-admin"), "admin")
    made = []
    for name in ("Alice", "Bob"):
        response = gateway.call("POST", f"/v1/users?requestId={unique('auth')}", token=admin,
                                body={"email": f"{unique(name)}@example.com", "displayName": name})
        assert response.status == 200, response.body
        made.append(response.json()["user"]["id"])
    return {"admin": admin, "alice": made[0], "bob": made[1]}


def _tokens(gateway, alice: str, forger: tokens.SigningKey) -> dict[str, str | None]:
    return {
        "none": None,
        "expired": gateway.mint(alice, "user:read", now=time.time() - 7200),
        "wrong issuer": gateway.mint(alice, "user:read", issuer="https://issuer.elsewhere.example"),
        "wrong audience": gateway.mint(alice, "user:read", audience="another-api"),
        "forged": gateway.mint(alice, "user:read", key=tokens.SigningKey(forger.private_pem, gateway.key.kid)),
        "missing scope": gateway.mint(alice, "order:read user:write"),
        "right scope": gateway.mint(alice, "user:read"),
        "another customer": gateway.mint(str(uuid.uuid4()), "user:read"),
        "admin": gateway.mint(unique("admin"), "admin"),
    }


# (token, REST status, grpcurl exit code) for alice's account.
MATRIX = [
    ("none", 401, UNAUTHENTICATED),
    ("expired", 401, UNAUTHENTICATED),
    ("wrong issuer", 401, UNAUTHENTICATED),
    ("wrong audience", 401, UNAUTHENTICATED),
    ("forged", 401, UNAUTHENTICATED),
    ("missing scope", 403, PERMISSION_DENIED),
    ("right scope", 200, OK),
    ("another customer", 403, PERMISSION_DENIED),
    ("admin", 200, OK),
]


@pytest.mark.parametrize(("who", "status", "exit_code"), MATRIX, ids=[m[0] for m in MATRIX])
def test_auth_matrix_over_rest_and_grpc(gateway, accounts, tmp_path, who, status, exit_code):
    token = _tokens(gateway, accounts["alice"], tokens.ensure_keys(tmp_path / "forger"))[who]
    rest = gateway.call("GET", f"/v1/users/{accounts['alice']}", token=token)
    assert rest.status == status, rest.body
    if status == 200:
        assert rest.json()["user"]["id"] == accounts["alice"]
    native = gateway.grpcurl(GET_USER, {"id": accounts["alice"]}, token=token)
    assert native.returncode == exit_code, native.stderr
    if exit_code == OK:
        assert accounts["alice"] in native.stdout


@pytest.mark.parametrize("scope", ["user:readonly", "user:read:all", "xuser:read", "user:reads", "USER:READ",
                                   "user:write", "user", ""])
def test_scopes_match_whole_words_only(gateway, accounts, scope):
    token = gateway.mint(accounts["alice"], f"order:read {scope}".strip())
    response = gateway.call("GET", f"/v1/users/{accounts['alice']}", token=token)
    assert response.status == 403
    assert response.json()["details"][0]["reason"] == "MISSING_SCOPE"


@pytest.mark.parametrize("scope", ["user:read", "order:read user:read payment:read", "admin"])
def test_one_matching_scope_in_the_list_grants_the_call(gateway, accounts, scope):
    token = gateway.mint(accounts["alice"], scope)
    assert gateway.call("GET", f"/v1/users/{accounts['alice']}", token=token).status == 200


def test_client_sent_identity_headers_are_replaced_by_the_token(gateway, accounts):
    token = gateway.mint(accounts["alice"], "user:read")
    spoofed = {"x-user-id": accounts["bob"], "x-user-scopes": "admin user:read"}
    # alice claims to be bob: the service still sees alice, so bob's account is refused...
    bob = gateway.call("GET", f"/v1/users/{accounts['bob']}", token=token, headers=spoofed)
    assert bob.status == 403 and bob.json()["details"][0]["domain"] == "user.tessera.dev"
    # ...and the admin scope she claims is not hers: listing accounts needs it.
    listing = gateway.call("GET", "/v1/users?pageSize=1", token=token, headers=spoofed)
    assert listing.status == 403 and listing.json()["details"][0]["reason"] == "PERMISSION_DENIED"
    native = gateway.grpcurl(GET_USER, {"id": accounts["bob"]}, token=token, headers=spoofed)
    assert native.returncode == PERMISSION_DENIED, native.stderr
    # Without a token, the spoofed headers grant nothing either.
    assert gateway.call("GET", f"/v1/users/{accounts['bob']}", headers=spoofed).status == 401


def test_services_in_production_refuse_calls_that_bypass_the_gateway(gateway, gateway_services, accounts):
    import subprocess

    from tests.support.gateway import DESCRIPTOR_SET, GRPCURL

    direct = subprocess.run(
        [GRPCURL, "-plaintext", "-protoset", str(DESCRIPTOR_SET), "-d", f'{{"id": "{accounts["alice"]}"}}',
         gateway_services.addresses()["user"], GET_USER], capture_output=True, text=True, timeout=60)
    assert direct.returncode == UNAUTHENTICATED
    assert "IDENTITY_MISSING" in direct.stdout + direct.stderr
    through = gateway.grpcurl(GET_USER, {"id": accounts["alice"]}, token=gateway.mint(accounts["alice"], "user:read"))
    assert through.returncode == OK, through.stderr


def test_native_grpc_through_the_gateway_keeps_rich_error_details(gateway, accounts):
    result = gateway.grpcurl(GET_USER, {"id": "not-a-uuid"}, token=accounts["admin"])
    assert result.returncode == 64 + 3
    assert "google.rpc.BadRequest" in result.stdout + result.stderr
    assert '"field":"id"' in (result.stdout + result.stderr).replace(" ", "")


def test_native_grpc_create_and_read_back(gateway, accounts):
    created = gateway.grpcurl("tessera.user.v1.UserService/CreateUser", {
        "user": {"email": f"{unique('grpc')}@example.com", "display_name": "Grace"}, "request_id": unique("grpc")},
        token=accounts["admin"])
    assert created.returncode == OK, created.stderr
    user_id = created.stdout.split('"id": "')[1].split('"')[0]
    read = gateway.grpcurl(GET_USER, {"id": user_id}, token=gateway.mint(user_id, "user:read"))
    assert read.returncode == OK and "Grace" in read.stdout


def test_reservations_are_the_sagas_not_the_catalogues(gateway):
    # inventory:read lets a shopper browse products; the reservations an order holds are read by operators only.
    shopper = gateway.mint(unique("shopper"), "inventory:read inventory:write order:read")
    for method, path in (("GET", f"/v1/reservations/{uuid.uuid4()}"), ("POST", "/v1/reservations")):
        response = gateway.call(method, path, body={} if method == "POST" else None, token=shopper)
        assert response.status == 403, (path, response.body)
        assert response.json()["details"][0]["reason"] == "MISSING_SCOPE"
    assert gateway.call("GET", "/v1/products?pageSize=1", token=shopper).status == 200


def test_payments_are_charged_refunded_and_voided_by_the_saga_not_by_customers(gateway):
    # payment:read lets a customer read their payments; taking, refunding or voiding one is for operators only.
    customer = unique("customer")
    token = gateway.mint(customer, "payment:read order:read order:write")
    for path in ("/v1/payments", f"/v1/payments/{uuid.uuid4()}:refund", "/v1/payments:void"):
        response = gateway.call("POST", path, body={}, token=token)
        assert response.status == 403, (path, response.body)
        assert response.json()["details"][0]["reason"] == "MISSING_SCOPE"


def test_every_rest_route_needs_a_token(gateway):
    # One route per RPC of every service; none of them may answer anything but 401 without a token.
    for rpc in gateway.generated.config.contracts.rpcs:
        path = rpc.http.path
        for variable in rpc.http.variables:
            path = path.replace("{" + variable + "}", str(uuid.uuid4()))
        response = gateway.call(rpc.http.method, path, body={} if rpc.http.body else None)
        assert response.status == 401, (rpc.full_name, response.status, response.body)
        assert response.json()["details"][0]["reason"] == "TOKEN_MISSING"


def test_a_cached_token_is_refused_once_it_expires(gateway, accounts):
    """Verified tokens are cached; the cache must still honour expiry (and the configured clock skew)."""
    skew = gateway.description.jwt.clock_skew_seconds
    issued = time.time() - 600
    # Valid for about 3 more seconds, the clock skew included.
    token = gateway.mint(accounts["alice"], "user:read", now=issued, ttl=600 - skew + 3)
    assert gateway.call("GET", f"/v1/users/{accounts['alice']}", token=token).status == 200
    assert gateway.call("GET", f"/v1/users/{accounts['alice']}", token=token).status == 200  # from the cache
    time.sleep(4.5)
    refused = gateway.call("GET", f"/v1/users/{accounts['alice']}", token=token)
    assert refused.status == 401
    assert refused.json()["details"][0]["reason"] == "TOKEN_EXPIRED"


def _without_subject(gateway, subject: str | None) -> str:
    """A token the gateway's key signed, valid in every other way, whose sub is absent (None) or the given value."""
    now = int(time.time())
    jwt_config = gateway.description.jwt
    claims = {"iss": jwt_config.issuer, "aud": jwt_config.audiences[0], "scope": "user:read inventory:read",
              "iat": now, "nbf": now, "exp": now + 600}
    if subject is not None:
        claims["sub"] = subject
    return jwt.encode(claims, gateway.key.private_pem, algorithm="RS256", headers={"kid": gateway.key.kid})


@pytest.mark.parametrize("subject", [None, ""], ids=["absent", "empty"])
def test_a_token_without_a_subject_is_refused_at_the_edge(gateway, accounts, subject):
    """The subject is who the call acts for and whose bucket it takes from: a token without one is invalid, not a
    caller the services see as anonymous with a rate limit nobody shares."""
    token = _without_subject(gateway, subject)
    rest = gateway.call("GET", f"/v1/users/{accounts['alice']}", token=token)
    assert rest.status == 401, rest.body
    info = rest.json()["details"][0]
    assert (info["domain"], info["reason"]) == ("gateway.tessera.dev", "TOKEN_INVALID"), rest.body
    assert rest.header("x-ratelimit-limit") is None  # refused before the limiter: it took no token
    native = gateway.grpcurl(GET_USER, {"id": accounts["alice"]}, token=token)
    assert native.returncode == UNAUTHENTICATED, native.stderr
    assert "TOKEN_INVALID" in native.stdout + native.stderr


@pytest.mark.parametrize("scope", ["user:read admin\tx", "user:read x\tadmin"])
def test_the_services_read_the_scopes_the_gateway_checked(gateway, accounts, scope):
    """The gateway splits the scope claim at spaces (RFC 6749): "admin\\tx" is one scope, not admin. The services
    must read x-user-scopes the same way, or a token the gateway admitted for user:read acts as admin there."""
    token = gateway.mint(str(uuid.uuid4()), [scope])
    other = gateway.call("GET", f"/v1/users/{accounts['alice']}", token=token)
    assert other.status == 403, other.body
    assert other.json()["details"][0]["domain"] == "user.tessera.dev"
    listing = gateway.call("GET", "/v1/users?pageSize=1", token=token)
    assert listing.status == 403, listing.body
    native = gateway.grpcurl(GET_USER, {"id": accounts["alice"]}, token=token)
    assert native.returncode == PERMISSION_DENIED, native.stdout


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR"])
def test_the_authorization_scheme_is_case_insensitive(gateway, accounts, scheme):
    """RFC 7235 section 2.1: the scheme is a case-insensitive token; "bearer <JWT>" is a bearer token too."""
    token = gateway.mint(accounts["alice"], "user:read")
    rest = gateway.call("GET", f"/v1/users/{accounts['alice']}", headers={"authorization": f"{scheme} {token}"})
    assert rest.status == 200, rest.body
    native = gateway.grpcurl(GET_USER, {"id": accounts["alice"]}, headers={"authorization": f"{scheme} {token}"})
    assert native.returncode == OK, native.stdout
    # A scheme that only starts like it is still no bearer token.
    other = gateway.call("GET", f"/v1/users/{accounts['alice']}", headers={"authorization": f"{scheme}x {token}"})
    assert other.status == 401 and other.json()["details"][0]["reason"] == "TOKEN_MISSING"


# Control characters a claim may hold (JSON escapes them) but no header value may: the tab is a header's whitespace.
CONTROL_CHARACTERS = ["\v", "\f", "\r", "\n", "\x00", "\x01", "\x1b", "\x7f"]


@pytest.fixture(scope="module")
def own_gateway(gateway_workdir, gateway_services, dead_port):
    """A gateway of this module's own in front of the user service: a test that fails by making a gateway eject
    the service must not take it away from every other test."""
    gw = user_gateway(gateway_workdir, gateway_services, dead_port, "claims")
    yield gw
    gw.stop()


def _upstream_counters(gw) -> dict[str, int | None]:
    names = ("upstream_rq_total", "outlier_detection.ejections_detected_consecutive_5xx",
             "outlier_detection.ejections_detected_consecutive_gateway_failure",
             "outlier_detection.ejections_enforced_total")
    return {name: gw.envoy.stat(f"cluster.user.{name}") for name in names}


@pytest.mark.parametrize("claim", ["sub", "scope"])
def test_a_claim_with_a_control_character_is_refused_at_the_edge(own_gateway, claim):
    """Copied into x-user-id or x-user-scopes, such a claim made the call fail upstream: a 503 that counted toward
    ejecting the healthy service. The token is invalid: 401 at the edge, and nothing reaches the service."""
    gw = own_gateway
    subject = unique("claims")
    good = gw.mint(subject, "user:read")
    assert gw.call("GET", "/v1/users?pageSize=1", token=gw.mint(subject, "admin")).status == 200
    before = _upstream_counters(gw)
    for character in CONTROL_CHARACTERS:
        value = f"a{character}b"
        token = (gw.mint(value, "admin") if claim == "sub" else gw.mint(subject, ["admin", value]))
        rest = gw.call("GET", "/v1/users?pageSize=1", token=token)
        assert rest.status == 401, (repr(character), rest.body)
        info = rest.json()["details"][0]
        assert (info["domain"], info["reason"]) == ("gateway.tessera.dev", "TOKEN_INVALID"), rest.body
        assert rest.header("x-ratelimit-limit") is None  # refused before the limiter: it took no token
        native = gw.grpcurl(LIST_USERS, {"page_size": 1}, token=token)
        assert native.returncode == UNAUTHENTICATED, (repr(character), native.stderr)
        assert "TOKEN_INVALID" in native.stdout + native.stderr
    assert _upstream_counters(gw) == before
    # The service was never ejected: the caller's valid tokens still reach it.
    assert gw.call("GET", "/v1/users?pageSize=1", token=gw.mint(subject, "admin")).status == 200
    assert gw.call("GET", f"/v1/users/{uuid.uuid4()}", token=good).status == 403


# Scope claims that are no space-delimited string (RFC 6749 section 3.3, RFC 8693 section 4.2): jwt_authn reads a
# JSON array's words as scopes, but copies no array (nor null) into x-user-scopes, and numbers and booleans as text.
NOT_A_STRING = [["admin"], ["user:read", "admin"], [], 7, 1.5, True, False, {"admin": True}, None]


@pytest.mark.parametrize("scope", NOT_A_STRING, ids=repr)
def test_a_scope_claim_that_is_not_a_string_is_refused_at_the_edge(own_gateway, scope):
    """Such a token passed the gateway's scope check while the services, reading x-user-scopes, saw none and
    answered 403: the gateway and the services disagreed on what it grants. The token is invalid: 401 at the edge,
    and nothing reaches the service."""
    gw = own_gateway
    subject = unique("claims")
    jwt_config = gw.description.jwt
    token = tokens.mint(gw.key, subject=subject, scopes=[], issuer=jwt_config.issuer,
                        audience=jwt_config.audiences[0], ttl_seconds=600, extra_claims={"scope": scope})
    assert gw.call("GET", "/v1/users?pageSize=1", token=gw.mint(subject, "admin")).status == 200
    before = _upstream_counters(gw)
    rest = gw.call("GET", "/v1/users?pageSize=1", token=token)
    assert rest.status == 401, rest.body
    info = rest.json()["details"][0]
    assert (info["domain"], info["reason"]) == ("gateway.tessera.dev", "TOKEN_INVALID"), rest.body
    assert rest.header("www-authenticate") == 'Bearer realm="tessera", error="invalid_token"'
    assert rest.json()["message"] == "the bearer token was refused: its scope claim is not a string", rest.body
    assert rest.header("x-ratelimit-limit") is None  # refused before the limiter: it took no token
    native = gw.grpcurl(LIST_USERS, {"page_size": 1}, token=token)
    assert native.returncode == UNAUTHENTICATED, native.stderr
    assert "TOKEN_INVALID" in native.stdout + native.stderr
    assert _upstream_counters(gw) == before
    # The same scope as a string is granted, at the gateway and at the service alike.
    assert gw.call("GET", "/v1/users?pageSize=1", token=gw.mint(subject, "user:read admin")).status == 200
