"""``security.authorize`` against the real Redis: a token the verifier remembers has both its
rate limits (the client IP's, then the principal's) taken in one Redis call, with the outcome
the two separate calls give; a token never seen is still throttled by IP before any token
work, and every refusal of a remembered token (revoked, lacking the scope) still charges the
IP first."""

from __future__ import annotations

import json
import time
import uuid
from types import SimpleNamespace
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.security import SecurityScopes

from services.gateway.ratelimit import RateLimiter
from services.gateway.redis_guard import GuardedRedis
from services.gateway.security import authorize
from services.gateway.settings import RateLimit
from shared.problems import Forbidden, TooManyRequests, Unauthorized
from shared.tokens import Principal, RevocationSet, TokenVerifier, token_revoked

pytestmark = pytest.mark.anyio

ISSUER, AUDIENCE, IP = "crossmodal-auth", "crossmodal-gateway", "203.0.113.5"
_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_JWK = jwt.PyJWK.from_dict(
    {
        **json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(_KEY.public_key())),
        "kid": "k1",
        "alg": "RS256",
    }
)


class Keys:
    def __init__(self) -> None:
        self.asked = 0

    async def key(self, kid: str) -> jwt.PyJWK | None:
        self.asked += 1
        return _JWK if kid == "k1" else None


class Revocations:
    def __init__(self) -> None:
        self.set = RevocationSet()

    async def check(self, principal: Principal) -> None:
        if self.set.is_revoked(principal):
            raise token_revoked()

    def ensure_fresh(self, *, write: bool) -> None:
        return None


def sign(**overrides: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "scope": "search:text",
        "iat": now - 5,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
    } | overrides
    return jwt.encode(claims, _KEY, algorithm="RS256", headers={"kid": "k1"})


class Gateway:
    """What ``authorize`` reads from the request: the state, the client address."""

    def __init__(self, guarded: GuardedRedis, prefix: str, *, ip: int, principal: int) -> None:
        self.keys = Keys()
        self.revocations = Revocations()
        self.verifier = TokenVerifier(
            self.keys,
            issuer=ISSUER,
            audience=AUDIENCE,
            revocations=self.revocations,
            memo_size=16,
        )
        self.limiter = RateLimiter(guarded, prefix=prefix)
        self.redis_calls = 0
        run = guarded.run

        async def counting(operation: Any) -> Any:
            self.redis_calls += 1
            return await run(operation)

        guarded.run = counting  # type: ignore[method-assign]
        settings = SimpleNamespace(
            ip_rate_limit=RateLimit(rate=0.001, burst=ip),
            rate_limits={"search:text": RateLimit(rate=0.001, burst=principal)},
        )
        state = SimpleNamespace(
            settings=settings,
            limiter=self.limiter,
            verifier=self.verifier,
            revocations=self.revocations,
        )
        self.request = SimpleNamespace(
            app=SimpleNamespace(state=SimpleNamespace(gateway=state)),
            client=SimpleNamespace(host=IP),
        )
        self.ip_key = self.limiter.bucket("ip", IP, settings.ip_rate_limit).key
        self.principal_key = self.limiter.bucket(
            "principal", "alice:search:text", settings.ip_rate_limit
        ).key
        self.guarded = guarded

    async def authorize(self, token: str | None, scope: str = "search:text") -> Principal:
        return await authorize(self.request, SecurityScopes([scope]), token)  # type: ignore[arg-type]

    async def left(self, key: str) -> float | None:
        raw = await self.guarded.client.hget(key, "tokens")
        return None if raw is None else float(raw)


async def test_a_remembered_token_takes_both_limits_in_one_redis_call(
    guarded: GuardedRedis, prefix: str
) -> None:
    gw = Gateway(guarded, prefix, ip=10, principal=10)
    token = sign()
    await gw.authorize(token)
    assert gw.redis_calls == 2  # first sight: the IP before the token work, then the principal
    gw.redis_calls = 0
    principal = await gw.authorize(token)
    assert principal.subject == "alice"
    assert gw.redis_calls == 1
    assert await gw.left(gw.ip_key) == pytest.approx(8, abs=0.1)
    assert await gw.left(gw.principal_key) == pytest.approx(8, abs=0.1)


async def test_the_ip_limit_comes_first_and_spares_the_principal_bucket(
    guarded: GuardedRedis, prefix: str
) -> None:
    gw = Gateway(guarded, prefix, ip=2, principal=10)
    token = sign()
    await gw.authorize(token)
    await gw.authorize(token)
    with pytest.raises(TooManyRequests) as raised:
        await gw.authorize(token)
    assert raised.value.extra == {"limit": "ip"}
    assert await gw.left(gw.principal_key) == pytest.approx(8, abs=0.1)


async def test_a_principal_refusal_still_charges_the_ip(guarded: GuardedRedis, prefix: str) -> None:
    gw = Gateway(guarded, prefix, ip=10, principal=1)
    token = sign()
    await gw.authorize(token)
    with pytest.raises(TooManyRequests) as raised:
        await gw.authorize(token)
    assert raised.value.extra == {"limit": "principal"}
    assert await gw.left(gw.ip_key) == pytest.approx(8, abs=0.1)


async def test_a_remembered_token_is_refused_once_revoked_and_the_ip_charged(
    guarded: GuardedRedis, prefix: str
) -> None:
    gw = Gateway(guarded, prefix, ip=3, principal=10)
    token = sign(jti="j-revoked")
    await gw.authorize(token)
    gw.revocations.set.apply([{"jti": "j-revoked", "expires_at": time.time() + 600}])
    with pytest.raises(Unauthorized) as raised:
        await gw.authorize(token)
    assert raised.value.code == "token_revoked"
    assert await gw.left(gw.ip_key) == pytest.approx(1, abs=0.1)
    assert await gw.left(gw.principal_key) == pytest.approx(9, abs=0.1)
    await gw.authorize(sign())  # the last IP token
    with pytest.raises(TooManyRequests) as throttled:  # the IP's 429 comes before the 401
        await gw.authorize(token)
    assert throttled.value.extra == {"limit": "ip"}


async def test_a_remembered_token_without_the_scope_is_refused_and_the_ip_charged(
    guarded: GuardedRedis, prefix: str
) -> None:
    gw = Gateway(guarded, prefix, ip=10, principal=10)
    token = sign()
    await gw.authorize(token)
    with pytest.raises(Forbidden) as raised:
        await gw.authorize(token, scope="items:write")
    assert raised.value.code == "insufficient_scope"
    assert await gw.left(gw.ip_key) == pytest.approx(8, abs=0.1)
    assert await gw.left(gw.principal_key) == pytest.approx(9, abs=0.1)


async def test_an_unknown_token_is_throttled_by_ip_before_any_token_work(
    guarded: GuardedRedis, prefix: str
) -> None:
    gw = Gateway(guarded, prefix, ip=1, principal=10)
    await gw.authorize(sign())
    asked = gw.keys.asked
    with pytest.raises(TooManyRequests) as raised:
        await gw.authorize(sign())
    assert raised.value.extra == {"limit": "ip"}
    assert gw.keys.asked == asked  # no key looked up, no signature checked
    with pytest.raises(TooManyRequests):  # a missing token too
        await gw.authorize(None)
