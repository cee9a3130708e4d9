"""TokenVerifier against a JWKS served by a small ASGI app: the attacks it must refuse
(alg none, HS256 with the public key, wrong aud or iss, expired, not yet valid, tampered,
unknown kid, revoked jti or subject, missing scope)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI

from shared.http import ServiceClient
from shared.problems import Forbidden, ServiceUnavailable, Unauthorized
from shared.tokens import Principal, RevocationSet, TokenVerifier, bearer_token, token_revoked

pytestmark = pytest.mark.anyio

ISSUER, AUDIENCE = "crossmodal-auth", "crossmodal-gateway"


class FromNow:
    """A time claim relative to the moment the token is signed, so that parameters computed at
    collection time stay in the future (or past) however long the suite takes to reach them."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def at(self, now: int) -> int:
        return now + self.seconds

    def __repr__(self) -> str:
        return f"now{self.seconds:+d}s"


class KeyServer:
    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.fetches = 0
        self.app = FastAPI()

        @self.app.get("/.well-known/jwks.json")
        async def jwks() -> dict[str, Any]:
            self.fetches += 1
            out = []
            for kid, key in self.keys.items():
                jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
                out.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
            return {"keys": out}

    def add_key(self, kid: str) -> rsa.RSAPrivateKey:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return self.keys[kid]

    def sign(self, kid: str, **overrides: Any) -> str:
        """A token signed with ``kid``; a claim given as ``FromNow(s)`` is made absolute here,
        when the token is signed, not when the test module was collected."""
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "alice",
            "scope": "search:text",
            "iat": now,
            "exp": now + 60,
            "jti": "j1",
        }
        claims.update({k: v.at(now) if isinstance(v, FromNow) else v for k, v in overrides.items()})
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, self.keys[kid], algorithm="RS256", headers={"kid": kid})


@pytest.fixture
def server() -> KeyServer:
    server = KeyServer()
    server.add_key("k1")
    return server


def verifier(server: KeyServer) -> TokenVerifier:
    client = ServiceClient("auth", "http://auth", transport=httpx.ASGITransport(app=server.app))
    return TokenVerifier(client, issuer=ISSUER, audience=AUDIENCE, min_refresh_interval=0)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_valid_token_gives_principal_and_scopes(server: KeyServer) -> None:
    principal = await verifier(server).verify(server.sign("k1", scope="search:text items:read"))
    assert principal.subject == "alice"
    assert principal.scopes == {"search:text", "items:read"}
    principal.require("items:read")
    with pytest.raises(Forbidden) as raised:
        principal.require("items:write")
    assert raised.value.code == "insufficient_scope"


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"exp": FromNow(-60)}, "token_expired"),
        ({"nbf": FromNow(+600)}, "invalid_token"),
        ({"aud": "someone-else"}, "invalid_token"),
        ({"iss": "evil"}, "invalid_token"),
        ({"sub": None}, "invalid_token"),
        ({"exp": None}, "invalid_token"),
        ({"scope": ["admin"]}, "invalid_token"),
    ],
)
async def test_bad_claims_are_refused(server: KeyServer, overrides: dict, code: str) -> None:
    with pytest.raises(Unauthorized) as raised:
        await verifier(server).verify(server.sign("k1", **overrides))
    assert raised.value.code == code


async def test_alg_none_and_hs256_with_public_key_are_refused(server: KeyServer) -> None:
    good = server.sign("k1")
    claims = jwt.decode(good, options={"verify_signature": False})
    head = b64(json.dumps({"alg": "none", "kid": "k1"}).encode())
    unsigned = f"{head}.{b64(json.dumps(claims).encode())}."
    pem = (
        server.keys["k1"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    head = b64(json.dumps({"alg": "HS256", "kid": "k1"}).encode())
    body = b64(json.dumps(claims).encode())
    mac = b64(hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest())
    for token in (unsigned, f"{head}.{body}.{mac}"):
        with pytest.raises(Unauthorized):
            await verifier(server).verify(token)


async def test_tampered_payload_is_refused(server: KeyServer) -> None:
    head, body, sig = server.sign("k1").split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["scope"] = "admin"
    with pytest.raises(Unauthorized) as raised:
        await verifier(server).verify(f"{head}.{b64(json.dumps(claims).encode())}.{sig}")
    assert raised.value.code == "invalid_token"


async def test_unknown_kid_refreshes_the_key_set_once(server: KeyServer) -> None:
    v = verifier(server)
    await v.verify(server.sign("k1"))
    assert server.fetches == 1
    server.add_key("k2")  # rotation: a new key appears after the cache was filled
    await v.verify(server.sign("k2"))
    assert server.fetches == 2
    with pytest.raises(Unauthorized):  # a known kid with a broken signature
        await v.verify(server.sign("k2").rsplit(".", 1)[0] + ".AAAA")
    server.keys["k3"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = server.sign("k3")
    del server.keys["k3"]
    with pytest.raises(Unauthorized) as raised:
        await v.verify(token)
    assert "unknown key" in raised.value.detail


def test_bearer_header_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    for bad in (None, "", "Basic abc", "Bearer", "Bearer  "):
        with pytest.raises(Unauthorized):
            bearer_token(bad)


class Revoked:
    """A revocation check backed by a ``RevocationSet``, as the gateway's list is."""

    def __init__(self) -> None:
        self.set = RevocationSet()

    async def check(self, principal: Principal) -> None:
        if self.set.is_revoked(principal):
            raise token_revoked()


async def test_revoked_jti_is_refused(server: KeyServer) -> None:
    revoked = Revoked()
    client = ServiceClient("auth", "http://auth", transport=httpx.ASGITransport(app=server.app))
    v = TokenVerifier(
        client, issuer=ISSUER, audience=AUDIENCE, min_refresh_interval=0, revocations=revoked
    )
    token = server.sign("k1", jti="j-revoked")
    assert (await v.verify(token)).token_id == "j-revoked"
    revoked.set.apply([{"jti": "j-revoked", "expires_at": time.time() + 60}])
    with pytest.raises(Unauthorized) as raised:
        await v.verify(token)
    assert raised.value.code == "token_revoked"
    # Another token of the same subject is not affected by a jti revocation.
    assert (await v.verify(server.sign("k1", jti="j-other"))).subject == "alice"


async def test_tokens_issued_before_a_subject_revocation_are_refused(server: KeyServer) -> None:
    revoked = Revoked()
    client = ServiceClient("auth", "http://auth", transport=httpx.ASGITransport(app=server.app))
    v = TokenVerifier(
        client, issuer=ISSUER, audience=AUDIENCE, min_refresh_interval=0, revocations=revoked
    )
    now = int(time.time())
    old = server.sign("k1", iat=now - 10, jti="a")
    new = server.sign("k1", iat=now, jti="b")
    other = server.sign("k1", sub="bob", iat=now - 10, jti="c")
    revoked.set.apply([{"sub": "alice", "not_before": now, "expires_at": now + 60}])
    with pytest.raises(Unauthorized) as raised:
        await v.verify(old)
    assert raised.value.code == "token_revoked"
    assert (await v.verify(new)).token_id == "b"
    assert (await v.verify(other)).subject == "bob"


@pytest.mark.parametrize(
    "overrides",
    [
        {"jti": None},  # a token that could not be revoked by id is not accepted at all
        {"jti": 42},
        {"iat": None},
        {"iat": FromNow(+600)},  # issued in the future: not yet valid
    ],
)
async def test_tokens_without_a_usable_jti_or_iat_are_refused(
    server: KeyServer, overrides: dict
) -> None:
    with pytest.raises(Unauthorized) as raised:
        await verifier(server).verify(server.sign("k1", **overrides))
    assert raised.value.code == "invalid_token"


async def test_unreachable_key_server_is_503_auth_unavailable(server: KeyServer) -> None:
    client = ServiceClient("auth", "http://127.0.0.1:9", retries=0)  # nothing listens on 9
    v = TokenVerifier(client, issuer=ISSUER, audience=AUDIENCE)
    with pytest.raises(ServiceUnavailable) as raised:
        await v.verify(server.sign("k1"))
    assert raised.value.code == "auth_unavailable"
    assert raised.value.headers["Retry-After"]
    await client.aclose()


def test_revocation_set_keeps_entries_until_they_expire() -> None:
    revocations = RevocationSet()
    revocations.apply(
        [
            {"jti": "j1", "expires_at": 100.0},
            {"sub": "alice", "not_before": 50, "expires_at": 200.0},
            {"sub": "alice", "not_before": 40, "expires_at": 150.0},  # older: never lowers it
        ]
    )
    alice = Principal("alice", frozenset(), token_id="j9", issued_at=45)
    assert revocations.is_revoked(alice)
    assert revocations.is_revoked(Principal("bob", frozenset(), token_id="j1", issued_at=0))
    revocations.prune(100.0)
    assert not revocations.is_revoked(Principal("bob", frozenset(), token_id="j1", issued_at=0))
    assert revocations.is_revoked(alice)
    revocations.prune(200.0)
    assert not revocations.is_revoked(alice)


def memo_verifier(
    server: KeyServer, *, revocations: Revoked | None = None, clock: Any = time.time, size: int = 8
) -> TokenVerifier:
    client = ServiceClient("auth", "http://auth", transport=httpx.ASGITransport(app=server.app))
    return TokenVerifier(
        client,
        issuer=ISSUER,
        audience=AUDIENCE,
        min_refresh_interval=0,
        revocations=revocations,
        memo_size=size,
        clock=clock,
    )


class Decodes:
    """Counts the signature checks (``jwt.decode`` calls) a verifier makes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = jwt.decode

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(jwt, "decode", counting)


async def test_a_remembered_token_is_not_verified_again(
    server: KeyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes = Decodes(monkeypatch)
    v = memo_verifier(server)
    token = server.sign("k1", scope="search:text items:read")
    first = await v.verify(token)
    assert await v.verify(token) is first
    assert decodes.count == 1
    # Another token, even of the same subject, is verified on its own.
    await v.verify(server.sign("k1", jti="j2"))
    assert decodes.count == 2
    # A forged token is never taken for a remembered one.
    with pytest.raises(Unauthorized):
        await v.verify(token[:-4] + "AAAA")


async def test_a_remembered_token_is_still_refused_once_revoked(
    server: KeyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    revoked = Revoked()
    decodes = Decodes(monkeypatch)
    v = memo_verifier(server, revocations=revoked)
    now = int(time.time())
    token = server.sign("k1", jti="j-later", iat=now - 10)
    await v.verify(token)
    await v.verify(token)
    assert decodes.count == 1
    revoked.set.apply([{"jti": "j-later", "expires_at": now + 60}])
    with pytest.raises(Unauthorized) as raised:
        await v.verify(token)
    assert raised.value.code == "token_revoked"
    # A subject-wide revocation too.
    other = server.sign("k1", jti="j-sub", iat=now - 10)
    await v.verify(other)
    revoked.set.apply([{"sub": "alice", "not_before": now, "expires_at": now + 60}])
    with pytest.raises(Unauthorized) as raised:
        await v.verify(other)
    assert raised.value.code == "token_revoked"


async def test_a_remembered_token_is_verified_again_from_its_exp(
    server: KeyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [time.time()]
    v = memo_verifier(server, clock=lambda: now[0])
    token = server.sign("k1", exp=FromNow(+60))
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    decodes = Decodes(monkeypatch)
    await v.verify(token)
    now[0] = exp - 1
    await v.verify(token)
    assert decodes.count == 1
    now[0] = exp
    await v.verify(token)  # the full check again (which still allows its leeway)
    assert decodes.count == 2


async def test_an_expired_remembered_token_is_refused(server: KeyServer) -> None:
    client = ServiceClient("auth", "http://auth", transport=httpx.ASGITransport(app=server.app))
    v = TokenVerifier(
        client, issuer=ISSUER, audience=AUDIENCE, leeway_seconds=0, min_refresh_interval=0,
        memo_size=8,
    )  # fmt: skip
    token = server.sign("k1", exp=FromNow(+1))
    await v.verify(token)
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    await asyncio.sleep(max(0.0, exp + 0.2 - time.time()))
    with pytest.raises(Unauthorized) as raised:
        await v.verify(token)
    assert raised.value.code == "token_expired"


async def test_a_remembered_token_of_a_removed_key_is_refused(server: KeyServer) -> None:
    client = ServiceClient("auth", "http://auth", transport=httpx.ASGITransport(app=server.app))
    v = TokenVerifier(
        client, issuer=ISSUER, audience=AUDIENCE, cache_seconds=0, min_refresh_interval=0,
        memo_size=8,
    )  # fmt: skip
    server.add_key("k2")
    token = server.sign("k2")
    await v.verify(token)
    del server.keys["k2"]  # the key is withdrawn from the JWKS
    with pytest.raises(Unauthorized) as raised:
        await v.verify(token)
    assert "unknown key" in raised.value.detail


async def test_the_memo_is_bounded(server: KeyServer, monkeypatch: pytest.MonkeyPatch) -> None:
    decodes = Decodes(monkeypatch)
    v = memo_verifier(server, size=2)
    a, b, c = (server.sign("k1", jti=j) for j in "abc")
    for token in (a, b, a, c):  # c pushes out b, the least recently used
        await v.verify(token)
    assert decodes.count == 3
    await v.verify(a)
    assert decodes.count == 3
    await v.verify(b)
    assert decodes.count == 4
