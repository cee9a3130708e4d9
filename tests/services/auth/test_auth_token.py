"""POST /token and GET /.well-known/jwks.json, in process."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from services.auth.scopes import KNOWN_SCOPES
from shared.http import ServiceClient
from shared.problems import ProblemError
from shared.tokens import Principal, TokenVerifier

CLIENT_ID = "indexer"
CLIENT_SECRET = "indexer-secret-0123456789"
READER_PASSWORD = "reader-password-123"
ALL_SCOPES = " ".join(KNOWN_SCOPES)


def _password(client: TestClient, username: str, password: str, **extra: str) -> httpx.Response:
    data = {"grant_type": "password", "username": username, "password": password, **extra}
    return client.post("/token", data=data)


def _decode(client: TestClient, token: str) -> dict[str, Any]:
    """Verify ``token`` against the service's own JWKS with pyjwt."""
    header = jwt.get_unverified_header(token)
    jwks = client.get("/.well-known/jwks.json").json()
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == header["kid"]]
    key = jwt.PyJWK.from_dict(jwk)
    return jwt.decode(
        token,
        key=key.key,
        algorithms=["RS256"],
        audience="crossmodal-gateway",
        issuer="crossmodal-auth",
        options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"]},
    )


def _assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == code
    assert body["status"] == status
    assert "access_token" not in body
    assert response.headers["cache-control"] == "no-store"
    return body


def _counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_password_grant_issues_a_token_that_verifies_against_the_jwks(client: TestClient) -> None:
    before = time.time()
    response = _password(client, "demo", "demo-password")

    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 600
    assert body["scope"] == ALL_SCOPES

    header = jwt.get_unverified_header(body["access_token"])
    assert header["alg"] == "RS256"
    jwks_response = client.get("/.well-known/jwks.json")
    assert jwks_response.headers["cache-control"] == "public, max-age=300"
    (jwk,) = jwks_response.json()["keys"]
    assert {"kid", "alg", "use", "kty", "n", "e"} <= jwk.keys()
    assert "d" not in jwk  # never the private exponent
    assert (jwk["alg"], jwk["use"], jwk["kty"]) == ("RS256", "sig", "RSA")
    assert header["kid"] == jwk["kid"]

    claims = _decode(client, body["access_token"])
    assert claims["iss"] == "crossmodal-auth"
    assert claims["aud"] == "crossmodal-gateway"
    assert claims["sub"] == "demo"
    assert claims["scope"] == ALL_SCOPES
    assert claims["exp"] - claims["iat"] == 600
    assert int(before) <= claims["iat"] <= time.time()
    assert claims["nbf"] == claims["iat"]
    assert uuid.UUID(claims["jti"]).version == 4


def test_each_token_has_its_own_jti(client: TestClient) -> None:
    first = _decode(client, _password(client, "demo", "demo-password").json()["access_token"])
    second = _decode(client, _password(client, "demo", "demo-password").json()["access_token"])
    assert first["jti"] != second["jti"]


def test_token_does_not_verify_with_another_key(client: TestClient) -> None:
    token = _password(client, "demo", "demo-password").json()["access_token"]
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, key=other, algorithms=["RS256"], audience="crossmodal-gateway")


def _verifier_for(app: FastAPI) -> tuple[ServiceClient, TokenVerifier]:
    # The in-process app behind the real JWKS fetch path of shared/tokens.py.
    auth = ServiceClient("auth", "http://auth.test", transport=httpx.ASGITransport(app=app))
    verifier = TokenVerifier(auth, issuer="crossmodal-auth", audience="crossmodal-gateway")
    return auth, verifier


async def _verify(app: FastAPI, token: str) -> Principal:
    auth, verifier = _verifier_for(app)
    try:
        return await verifier.verify(token)
    finally:
        await auth.aclose()


def test_token_passes_the_gateway_verifier(client: TestClient) -> None:
    body = _password(client, "reader", READER_PASSWORD, scope="items:read").json()
    principal = asyncio.run(_verify(client.app, body["access_token"]))
    assert principal.subject == "reader"
    assert principal.scopes == frozenset({"items:read"})
    assert principal.token_id == _decode(client, body["access_token"])["jti"]


def test_gateway_verifier_rejects_a_token_signed_by_a_foreign_key(client: TestClient) -> None:
    token = _password(client, "demo", "demo-password").json()["access_token"]
    claims = _decode(client, token)
    kid = jwt.get_unverified_header(token)["kid"]
    foreign = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims, foreign, algorithm="RS256", headers={"kid": kid})
    with pytest.raises(ProblemError) as caught:
        asyncio.run(_verify(client.app, forged))
    assert caught.value.status == 401
    assert caught.value.code == "invalid_token"


@pytest.mark.parametrize(
    ("username", "password", "reason"),
    [
        ("demo", "wrong-password", "bad_secret"),
        ("nobody", "demo-password", "unknown_principal"),
        (CLIENT_ID, CLIENT_SECRET, "unknown_principal"),  # a client is not a user
    ],
)
def test_bad_user_credentials_are_invalid_grant(
    client: TestClient, username: str, password: str, reason: str
) -> None:
    before = _counter("auth_token_failures_total", reason=reason)
    body = _assert_problem(_password(client, username, password), 401, "invalid_grant")
    assert body["detail"] == "invalid username or password"  # the same for every cause
    assert _counter("auth_token_failures_total", reason=reason) == before + 1


def test_a_disabled_account_answers_as_a_wrong_password(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    assert _password(client, "reader", READER_PASSWORD).status_code == 200
    assert client.app.state.auth.service.principals.set_disabled("reader", True)
    disabled_before = _counter("auth_token_failures_total", reason="disabled")
    with caplog.at_level("INFO", logger="services.auth.app"):
        right = _password(client, "reader", READER_PASSWORD)
    wrong = _password(client, "reader", "not-the-password")
    # The right password of a disabled account would be confirmed by any difference.
    for response in (right, wrong):
        _assert_problem(response, 401, "invalid_grant")
    assert right.json() == wrong.json()
    assert right.json()["detail"] == "invalid username or password"
    # All but what differs for every request: its id, its trace span, the time.
    per_request = ("x-request-id", "traceresponse", "date")
    assert {k: v for k, v in right.headers.items() if k not in per_request} == {
        k: v for k, v in wrong.headers.items() if k not in per_request
    }
    # The reason is kept for the operators: in the metric and the log.
    assert _counter("auth_token_failures_total", reason="disabled") == disabled_before + 1
    assert "invalid_grant (disabled)" in caplog.text


@pytest.mark.parametrize("grant_type", ["authorization_code", "device_code", "implicit"])
def test_unsupported_grant_type(client: TestClient, grant_type: str) -> None:
    response = client.post("/token", data={"grant_type": grant_type, "code": "x"})
    _assert_problem(response, 400, "unsupported_grant_type")


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"grant_type": ""},
        {"grant_type": "password", "username": "demo"},
        {"grant_type": "password", "password": "demo-password"},
        {"grant_type": "password", "username": "demo", "password": ""},
        {"grant_type": "password", "username": "demo", "password": "x" * 1025},
        {"grant_type": "client_credentials", "client_id": CLIENT_ID},
        {"grant_type": "client_credentials", "client_secret": CLIENT_SECRET},
    ],
)
def test_missing_or_oversized_fields_are_invalid_request(
    client: TestClient, data: dict[str, str]
) -> None:
    _assert_problem(client.post("/token", data=data), 400, "invalid_request")


def test_json_body_is_invalid_request(client: TestClient) -> None:
    response = client.post(
        "/token",
        json={"grant_type": "password", "username": "demo", "password": "demo-password"},
    )
    _assert_problem(response, 400, "invalid_request")


def test_repeated_parameter_is_invalid_request(client: TestClient) -> None:
    response = client.post(
        "/token",
        content="grant_type=password&username=demo&username=reader&password=demo-password",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    _assert_problem(response, 400, "invalid_request")


def test_requested_scopes_narrow_the_token(client: TestClient) -> None:
    response = _password(client, "demo", "demo-password", scope="items:read  search:text")
    assert response.status_code == 200, response.text
    # Canonical order (the documented one), whatever order was requested.
    assert response.json()["scope"] == "search:text items:read"
    claims = _decode(client, response.json()["access_token"])
    assert claims["scope"] == "search:text items:read"


def test_no_requested_scope_grants_the_principals_scopes(client: TestClient) -> None:
    response = _password(client, "reader", READER_PASSWORD)
    assert response.json()["scope"] == "search:text items:read"


@pytest.mark.parametrize("scope", ["admin", "search:text admin", "no-such-scope"])
def test_scope_not_granted_is_invalid_scope(client: TestClient, scope: str) -> None:
    before = _counter("auth_tokens_issued_total", grant_type="password")
    _assert_problem(_password(client, "reader", READER_PASSWORD, scope=scope), 400, "invalid_scope")
    assert _counter("auth_tokens_issued_total", grant_type="password") == before


def test_client_credentials_in_the_body(client: TestClient) -> None:
    before = _counter("auth_tokens_issued_total", grant_type="client_credentials")
    response = client.post(
        "/token",
        data={
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "scope": "items:write",
        },
    )
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    claims = _decode(client, response.json()["access_token"])
    assert claims["sub"] == CLIENT_ID
    assert claims["scope"] == "items:write"
    assert _counter("auth_tokens_issued_total", grant_type="client_credentials") == before + 1


def _basic(client_id: str, secret: str) -> dict[str, str]:
    raw = f"{client_id}:{secret}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def test_client_credentials_with_http_basic(client: TestClient) -> None:
    response = client.post(
        "/token",
        data={"grant_type": "client_credentials"},
        headers=_basic(CLIENT_ID, CLIENT_SECRET),
    )
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "items:read items:write"
    assert _decode(client, response.json()["access_token"])["sub"] == CLIENT_ID


@pytest.mark.parametrize(
    "headers",
    [
        _basic(CLIENT_ID, "wrong-secret"),
        _basic("unknown-client", CLIENT_SECRET),
        _basic("demo", "demo-password"),  # a user is not a client
        {"Authorization": "Basic %%%not-base64"},
        {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
    ],
)
def test_bad_client_credentials_are_invalid_client(
    client: TestClient, headers: dict[str, str]
) -> None:
    response = client.post("/token", data={"grant_type": "client_credentials"}, headers=headers)
    _assert_problem(response, 401, "invalid_client")
    assert response.headers["www-authenticate"].startswith("Basic")


def test_a_disabled_client_answers_as_a_wrong_secret(client: TestClient) -> None:
    assert client.app.state.auth.service.principals.set_disabled(CLIENT_ID, True)

    def grant(secret: str) -> httpx.Response:
        return client.post(
            "/token", data={"grant_type": "client_credentials"}, headers=_basic(CLIENT_ID, secret)
        )

    right, wrong = grant(CLIENT_SECRET), grant("not-the-secret")
    for response in (right, wrong):
        _assert_problem(response, 401, "invalid_client")
    assert right.json() == wrong.json()
    assert right.json()["detail"] == "invalid client credentials"


def test_wrong_client_secret_in_the_body_is_invalid_client(client: TestClient) -> None:
    data = {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": "nope"}
    _assert_problem(client.post("/token", data=data), 401, "invalid_client")


def test_client_credentials_in_basic_and_body_is_invalid_request(client: TestClient) -> None:
    response = client.post(
        "/token",
        data={"grant_type": "client_credentials", "client_id": CLIENT_ID},
        headers=_basic(CLIENT_ID, CLIENT_SECRET),
    )
    _assert_problem(response, 400, "invalid_request")


def test_client_scope_not_granted_is_invalid_scope(client: TestClient) -> None:
    response = client.post(
        "/token",
        data={"grant_type": "client_credentials", "scope": "admin"},
        headers=_basic(CLIENT_ID, CLIENT_SECRET),
    )
    _assert_problem(response, 400, "invalid_scope")


def test_metrics_exposes_the_token_counters(client: TestClient) -> None:
    _password(client, "demo", "demo-password")
    _password(client, "demo", "bad")
    text = client.get("/metrics").text
    assert 'auth_tokens_issued_total{grant_type="password"}' in text
    assert 'auth_token_failures_total{reason="bad_secret"}' in text
    assert 'auth_tokens_issued_total{grant_type="client_credentials"}' in text


def test_ready_when_started(client: TestClient) -> None:
    assert client.get("/readyz").status_code == 200
    assert client.get("/healthz").json() == {"status": "ok"}


def test_not_ready_when_the_database_is_unreachable(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable() -> None:
        raise ConnectionError("database down")

    monkeypatch.setattr(client.app.state.auth.service.principals, "ping", unreachable)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["code"] == "not_ready"
