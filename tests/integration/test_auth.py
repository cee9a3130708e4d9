"""Token checks at the gateway against tokens issued by the real auth service: the attack suite
(no token, malformed, alg none, HS256 with the public key, another key, tampered, expired, not yet
valid, wrong aud or iss, unknown kid, revoked jti, missing scope), revocation, refresh tokens, the
admin API, request ids across the five services and the OpenAPI document."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from crossmodal.stack import SERVICES, LocalStack
from tests.integration.support import assert_problem, get_token

QUERY = {"query": "a red circle", "collection": "shapes"}
SERVICE_NAMES = [spec.name for spec in SERVICES]


def _claims(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def test_no_token_is_401(gateway: httpx.Client) -> None:
    assert_problem(gateway.post("/search/text", json=QUERY), 401, "missing_token")


def test_malformed_authorization_is_401(gateway: httpx.Client) -> None:
    response = gateway.post("/search/text", json=QUERY, headers={"Authorization": "Basic abc"})
    assert_problem(response, 401, "missing_token")
    response = gateway.post("/search/text", json=QUERY, headers={"Authorization": "Bearer abc"})
    assert_problem(response, 401, "invalid_token")


def test_token_without_scope_is_403(gateway: httpx.Client) -> None:
    token = get_token(gateway, scope="items:read")
    assert _claims(token)["scope"] == "items:read"
    headers = {"Authorization": f"Bearer {token}"}
    body = assert_problem(
        gateway.post("/search/text", json=QUERY, headers=headers), 403, "insufficient_scope"
    )
    assert body["required_scopes"] == ["search:text"]
    response = gateway.post(
        "/items",
        headers=headers,
        data={"collection": "shapes"},
        files={"image": ("a.png", b"x", "image/png")},
    )
    assert_problem(response, 403, "insufficient_scope")


def _sign(stack: LocalStack, claims: dict, kid: str) -> str:
    key = (stack.data_dir / "auth" / "signing-key.pem").read_bytes()
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


def test_expired_token_is_401(gateway: httpx.Client, stack: LocalStack, token: str) -> None:
    claims = _claims(token)
    kid = jwt.get_unverified_header(token)["kid"]
    now = int(time.time())
    claims.update(iat=now - 3600, nbf=now - 3600, exp=now - 600)
    expired = _sign(stack, claims, kid)
    response = gateway.post(
        "/search/text", json=QUERY, headers={"Authorization": f"Bearer {expired}"}
    )
    assert_problem(response, 401, "token_expired")
    # The same claims with a live expiry pass: the expiry alone was refused.
    claims.update(exp=now + 600)
    fresh = _sign(stack, claims, kid)
    response = gateway.post(
        "/search/text", json=QUERY, headers={"Authorization": f"Bearer {fresh}"}
    )
    assert response.status_code != 401, response.text


def test_tampered_token_is_401(gateway: httpx.Client, token: str) -> None:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["scope"] = "admin search:text search:image items:read items:write"
    claims["sub"] = "someone-else"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    response = gateway.post(
        "/search/text",
        json=QUERY,
        headers={"Authorization": f"Bearer {header}.{forged}.{signature}"},
    )
    assert_problem(response, 401, "invalid_token")


def test_token_signed_by_another_key_is_401(gateway: httpx.Client, token: str) -> None:
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = _claims(token)
    kid = jwt.get_unverified_header(token)["kid"]
    forged = jwt.encode(claims, other_key, algorithm="RS256", headers={"kid": kid})
    response = gateway.post(
        "/search/text", json=QUERY, headers={"Authorization": f"Bearer {forged}"}
    )
    assert_problem(response, 401, "invalid_token")


def test_unsigned_and_symmetric_tokens_are_401(
    gateway: httpx.Client, stack: LocalStack, token: str
) -> None:
    claims = _claims(token)
    kid = jwt.get_unverified_header(token)["kid"]
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": kid})
    jwks = httpx.get(f"{stack.url('auth')}/.well-known/jwks.json", timeout=5).json()
    public_pem = jwt.PyJWK.from_dict(jwks["keys"][0]).key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for forged in (unsigned, _hs256(claims, public_pem, kid)):
        response = gateway.post(
            "/search/text", json=QUERY, headers={"Authorization": f"Bearer {forged}"}
        )
        assert_problem(response, 401, "invalid_token")


def _hs256(claims: dict, secret: bytes, kid: str) -> str:
    # PyJWT refuses PEM keys as HMAC secrets, so the classic confusion token is built by hand.
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


# -- more attacks, signed with the real key --------------------------------------------------


def _fresh_claims(token: str, changes: Callable[[int], dict] = lambda now: {}) -> dict:
    """The token's claims re-timed to now, then ``changes(now)`` applied: a time in the future
    is computed here, when the token is signed, not when the module was collected."""
    claims = _claims(token)
    now = int(time.time())
    claims.update(iat=now, nbf=now, exp=now + 600, jti=f"forged-{uuid.uuid4()}")
    claims.update(changes(now))
    return claims


@pytest.mark.parametrize(
    "changes",
    [
        lambda now: {"aud": "someone-else"},
        lambda now: {"iss": "evil-auth"},
        lambda now: {"nbf": now + 3600},  # not yet valid
        lambda now: {"iat": now + 3600},  # issued in the future
    ],
    ids=["wrong-aud", "wrong-iss", "not-yet-valid", "future-iat"],
)
def test_validly_signed_but_wrongly_addressed_or_timed_tokens_are_401(
    gateway: httpx.Client, stack: LocalStack, token: str, changes: Callable[[int], dict]
) -> None:
    kid = jwt.get_unverified_header(token)["kid"]
    bad = _sign(stack, _fresh_claims(token, changes), kid)
    response = gateway.get("/items/999999999", headers={"Authorization": f"Bearer {bad}"})
    assert_problem(response, 401, "invalid_token")
    # The control: the same claims, correctly addressed and timed, are accepted (404: no item).
    good = _sign(stack, _fresh_claims(token), kid)
    response = gateway.get("/items/999999999", headers={"Authorization": f"Bearer {good}"})
    assert_problem(response, 404, "item_not_found")


def test_unknown_kid_is_401(gateway: httpx.Client, stack: LocalStack, token: str) -> None:
    forged = _sign(stack, _fresh_claims(token), "no-such-key-id")
    response = gateway.get("/items/999999999", headers={"Authorization": f"Bearer {forged}"})
    body = assert_problem(response, 401, "invalid_token")
    assert "unknown key" in body["detail"]


# -- revocation, refresh tokens, admin --------------------------------------------------------

PROBE = "/items/999999999"  # items:read; 404 item_not_found means "token accepted"


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _login(gateway: httpx.Client, username: str, password: str) -> dict:
    response = gateway.post(
        "/auth/token",
        data={"grant_type": "password", "username": username, "password": password},
    )
    assert response.status_code == 200, response.text
    return response.json()


def _new_user(gateway: httpx.Client, admin: dict[str, str], scopes: list[str]) -> tuple[str, str]:
    name, password = f"user-{uuid.uuid4().hex[:10]}", f"pw-{uuid.uuid4().hex}"
    response = gateway.post(
        "/admin/principals",
        headers=admin,
        json={"name": name, "secret": password, "scopes": scopes},
    )
    assert response.status_code == 201, response.text
    return name, password


def _refused_within(gateway: httpx.Client, token: str, seconds: float = 10.0) -> float:
    """Poll until the gateway refuses ``token`` as revoked; returns how long it took."""
    started = time.monotonic()
    while True:
        response = gateway.get(PROBE, headers=_bearer(token))
        if response.status_code == 401:
            assert_problem(response, 401, "token_revoked")
            return time.monotonic() - started
        assert_problem(response, 404, "item_not_found")
        assert time.monotonic() - started < seconds, "the revocation did not reach the gateway"
        time.sleep(0.25)


def test_a_revoked_jti_is_refused_by_the_gateway_within_seconds(
    gateway: httpx.Client, auth: dict[str, str]
) -> None:
    victim = get_token(gateway, scope="items:read")
    other = get_token(gateway, scope="items:read")
    assert_problem(gateway.get(PROBE, headers=_bearer(victim)), 404, "item_not_found")
    response = gateway.post(
        "/admin/revocations", headers=auth, json={"jti": _claims(victim)["jti"]}
    )
    assert response.status_code == 201, response.text
    assert _refused_within(gateway, victim) < 10
    # Only that token: another token of the same user still works.
    assert_problem(gateway.get(PROBE, headers=_bearer(other)), 404, "item_not_found")


def test_revoking_every_token_of_a_principal(gateway: httpx.Client, auth: dict[str, str]) -> None:
    name, password = _new_user(gateway, auth, ["items:read"])
    login = _login(gateway, name, password)
    response = gateway.post(f"/admin/principals/{name}/revoke-tokens", headers=auth)
    assert response.status_code == 200, response.text
    _refused_within(gateway, login["access_token"])
    refresh = gateway.post(
        "/auth/token", data={"grant_type": "refresh_token", "refresh_token": login["refresh_token"]}
    )
    assert_problem(refresh, 401, "invalid_grant")
    time.sleep(1.1)  # tokens issued in the second of the revocation count as before it
    fresh = _login(gateway, name, password)["access_token"]
    assert_problem(gateway.get(PROBE, headers=_bearer(fresh)), 404, "item_not_found")


def test_disabling_a_principal_refuses_its_tokens_and_logins(
    gateway: httpx.Client, auth: dict[str, str]
) -> None:
    name, password = _new_user(gateway, auth, ["items:read"])
    token = _login(gateway, name, password)["access_token"]
    response = gateway.patch(f"/admin/principals/{name}", headers=auth, json={"disabled": True})
    assert response.status_code == 200 and response.json()["disabled"] is True
    _refused_within(gateway, token)
    response = gateway.post(
        "/auth/token", data={"grant_type": "password", "username": name, "password": password}
    )
    assert_problem(response, 401, "invalid_grant")
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_refresh_rotation_and_reuse_detection_through_the_gateway(
    gateway: httpx.Client, auth: dict[str, str]
) -> None:
    name, password = _new_user(gateway, auth, ["items:read"])
    first = _login(gateway, name, password)
    response = gateway.post(
        "/auth/token", data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    )
    assert response.status_code == 200, response.text
    second = response.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert_problem(
        gateway.get(PROBE, headers=_bearer(second["access_token"])), 404, "item_not_found"
    )
    # The rotated token shows up again: stolen. The family and its access tokens are revoked.
    reused = gateway.post(
        "/auth/token", data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    )
    assert_problem(reused, 401, "invalid_grant")
    _refused_within(gateway, second["access_token"])
    again = gateway.post(
        "/auth/token",
        data={"grant_type": "refresh_token", "refresh_token": second["refresh_token"]},
    )
    assert_problem(again, 401, "invalid_grant")


def test_logout_revokes_the_access_token(gateway: httpx.Client) -> None:
    token = get_token(gateway, scope="items:read")
    assert gateway.post("/auth/revoke", data={"token": token}).status_code == 200
    _refused_within(gateway, token)


def test_client_credentials_with_http_basic_through_the_gateway(
    gateway: httpx.Client, auth: dict[str, str]
) -> None:
    name = f"client-{uuid.uuid4().hex[:10]}"
    response = gateway.post(
        "/admin/principals",
        headers=auth,
        json={"name": name, "kind": "client", "scopes": ["items:read"]},
    )
    assert response.status_code == 201, response.text
    secret = response.json()["secret"]
    basic = base64.b64encode(f"{name}:{secret}".encode()).decode()
    response = gateway.post(
        "/auth/token",
        data={"grant_type": "client_credentials"},
        headers={"Authorization": f"Basic {basic}"},
    )
    assert response.status_code == 200, response.text
    assert "refresh_token" not in response.json()
    assert_problem(
        gateway.get(PROBE, headers=_bearer(response.json()["access_token"])), 404, "item_not_found"
    )
    wrong = base64.b64encode(f"{name}:wrong-secret".encode()).decode()
    response = gateway.post(
        "/auth/token",
        data={"grant_type": "client_credentials"},
        headers={"Authorization": f"Basic {wrong}"},
    )
    assert_problem(response, 401, "invalid_client")
    assert response.headers["www-authenticate"].startswith("Basic")


def test_admin_api_needs_the_admin_scope(gateway: httpx.Client, auth: dict[str, str]) -> None:
    assert_problem(gateway.get("/admin/principals"), 401, "missing_token")
    reader = _bearer(get_token(gateway, scope="items:read"))
    body = assert_problem(
        gateway.get("/admin/principals", headers=reader), 403, "insufficient_scope"
    )
    assert body["required_scopes"] == ["admin"]
    response = gateway.get("/admin/principals", headers=auth)
    assert response.status_code == 200
    assert "demo" in {p["name"] for p in response.json()["principals"]}
    assert_problem(
        gateway.get("/admin/principals/no-such-principal", headers=auth), 404, "principal_not_found"
    )


# -- request ids and the public API document -------------------------------------------------


def _lines_with(path: Path, request_id: str) -> list[dict]:
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        if request_id in raw:
            entry = json.loads(raw)  # every line is one JSON object
            assert entry["request_id"] == request_id
            lines.append(entry)
    return lines


def test_one_request_id_is_followed_through_all_five_services(
    gateway: httpx.Client, stack: LocalStack, shapes: dict
) -> None:
    request_id = f"trace-{uuid.uuid4().hex}"
    headers = {"X-Request-ID": request_id}
    # The session of one user: a login (gateway, auth), then a search (gateway, feature,
    # metadata for the filter and the items, retrieval), all under the caller's id.
    response = gateway.post(
        "/auth/token",
        data={"grant_type": "password", "username": "demo", "password": "demo-password"},
        headers=headers,
    )
    assert response.headers["x-request-id"] == request_id
    token = response.json()["access_token"]
    response = gateway.post(
        "/search/text",
        headers={**headers, "Authorization": f"Bearer {token}"},
        json={
            "query": f"a red circle {request_id}",  # a fresh query: no cache short-cut
            "collection": "shapes",
            "filters": {"shape": "circle"},
        },
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == request_id
    logs = stack.data_dir / "logs"
    deadline = time.monotonic() + 10
    found: dict[str, list[dict]] = {}
    while time.monotonic() < deadline:
        found = {s: _lines_with(logs / f"{s}.log", request_id) for s in SERVICE_NAMES}
        # The gateway's line for the search is written once the answer has gone out.
        if all(found.values()) and len(found["gateway"]) >= 2:
            break
        time.sleep(0.2)
    assert {s for s, lines in found.items() if lines} == set(SERVICE_NAMES)
    for service, lines in found.items():
        assert all(line["service"] == service for line in lines)
    gateway_paths = " ".join(line["msg"] for line in found["gateway"])
    assert "/auth/token" in gateway_paths and "/search/text" in gateway_paths


def test_openapi_document_and_docs_page(gateway: httpx.Client) -> None:
    assert gateway.get("/docs").status_code == 200
    doc = gateway.get("/openapi.json").json()
    assert "Problem" in doc["components"]["schemas"]
    assert doc["paths"]["/search/text"]["post"]["security"] == [{"OAuth2": ["search:text"]}]
    responses = doc["paths"]["/search/image"]["post"]["responses"]
    assert {"401", "403", "413", "415", "422", "429", "503"} <= set(responses)
