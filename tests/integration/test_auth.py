"""Token checks at the gateway, against tokens issued by the real auth service."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from crossmodal.stack import LocalStack
from tests.integration.support import assert_problem, get_token

QUERY = {"query": "a red circle", "collection": "shapes"}


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
