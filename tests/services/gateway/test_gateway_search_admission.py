"""A search's rate-limit charge rides on its cache lookup: one Redis round trip for both, with
the outcome two separate calls give (a refused request is never served, not even from the
cache), a request refused for its input before its lookup is charged all the same, and a
Redis that lost its scripts (a restart) still answers."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.security import SecurityScopes
from starlette.datastructures import State

from services.gateway.app import BudgetMiddleware
from services.gateway.cache import ResultCache
from services.gateway.redis_guard import GuardedRedis, ScriptCall, run_scripts
from services.gateway.security import Admission, admit, settle_admission
from shared.problems import TooManyRequests
from tests.services.gateway.test_gateway_security import Gateway, sign

pytestmark = pytest.mark.anyio

PARTS = {"text": "a red circle", "target": "image", "top_k": 5, "collection": "c", "filters": None}


class Search:
    """``admit`` as the search routes use it, and the cache lookup they make."""

    def __init__(self, guarded: GuardedRedis, prefix: str, *, ip: int, principal: int) -> None:
        self.gw = Gateway(guarded, prefix, ip=ip, principal=principal)
        self.cache = ResultCache(guarded, prefix=prefix, ttl_seconds=60)
        self.token = sign()
        # The request's ASGI scope: ``admit`` leaves the admission in its state.
        self.scope: dict[str, Any] = {"state": {}}
        self.gw.request.state = State(self.scope["state"])  # type: ignore[attr-defined]

    async def admitted(self) -> Admission:
        return await admit(self.gw.request, SecurityScopes(["search:text"]), self.token)  # type: ignore[arg-type]

    async def run(self) -> bytes | None:
        """One search answered from the cache when it can (the page is stored on a miss)."""
        admission = await self.admitted()
        try:
            found = await self.cache.lookup(PARTS, None, admission.charge)
            if found.page is None:
                await self.cache.save(found.key, b'{"results":[]}')
            return found.page
        finally:
            await settle_admission(self.scope)


async def test_the_charge_and_the_lookup_share_one_round_trip(
    guarded: GuardedRedis, prefix: str
) -> None:
    search = Search(guarded, prefix, ip=10, principal=10)
    assert await search.run() is None  # first sight of the token: IP, then principal + lookup
    search.gw.redis_calls = 0
    assert await search.run() == b'{"results":[]}'
    assert search.gw.redis_calls == 1  # a cache hit: one round trip, rate limits included
    assert await search.gw.left(search.gw.ip_key) == pytest.approx(8, abs=0.1)
    assert await search.gw.left(search.gw.principal_key) == pytest.approx(8, abs=0.1)


async def test_a_refused_search_is_not_served_from_the_cache(
    guarded: GuardedRedis, prefix: str
) -> None:
    search = Search(guarded, prefix, ip=10, principal=2)
    await search.run()
    assert await search.run() == b'{"results":[]}'
    with pytest.raises(TooManyRequests) as raised:
        await search.run()
    assert raised.value.extra == {"limit": "principal"}
    assert int(raised.value.headers["Retry-After"]) >= 1


async def test_a_search_refused_for_its_input_is_charged_all_the_same(
    guarded: GuardedRedis, prefix: str
) -> None:
    search = Search(guarded, prefix, ip=10, principal=10)
    await search.run()
    admission = await search.admitted()
    assert admission.charge is not None and not admission.charge.settled

    async def refused_route(scope: Any, receive: Any, send: Any) -> None:
        # What FastAPI does for a 422: the dependency ran, the route did not.
        assert scope["state"]["admission"] is admission
        await send({"type": "http.response.start", "status": 422, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    envelope = BudgetMiddleware(refused_route, search_seconds=5, default_seconds=5)
    search.scope.update(type="http", path="/search/text")
    await envelope(search.scope, None, send)  # type: ignore[arg-type]
    assert sent[0]["status"] == 422
    assert admission.charge.settled
    assert await search.gw.left(search.gw.principal_key) == pytest.approx(8, abs=0.1)
    await settle_admission(search.scope)  # settled once only
    assert await search.gw.left(search.gw.principal_key) == pytest.approx(8, abs=0.1)


async def test_scripts_redis_forgot_are_loaded_again(guarded: GuardedRedis, prefix: str) -> None:
    script = guarded.client.register_script("return ARGV[1] .. redis.call('GET', KEYS[1])")
    await guarded.client.set(f"{prefix}:k", "-there")
    await guarded.client.script_flush()  # what a restart does to the script cache
    call = ScriptCall(script, [f"{prefix}:k"], ["here"])
    assert await run_scripts(guarded.client, [call, call]) == [b"here-there", b"here-there"]
    assert await run_scripts(guarded.client, [call]) == [b"here-there"]


async def test_redis_down_lets_a_search_through_uncached(dead: GuardedRedis, prefix: str) -> None:
    from services.gateway.ratelimit import RateLimiter
    from services.gateway.settings import RateLimit

    limiter = RateLimiter(dead, prefix=prefix)
    cache = ResultCache(dead, prefix=prefix, ttl_seconds=60)
    bucket = limiter.bucket("principal", "alice:search:text", RateLimit(rate=1, burst=1))
    charge = limiter.charge([bucket], write=False)
    assert charge is not None
    found = await cache.lookup(PARTS, None, charge)
    assert (found.key, found.page) == (None, None)
    assert charge.settled
    write = limiter.charge([bucket], write=True)
    assert write is not None
    with pytest.raises(Exception) as refused:
        await cache.lookup(PARTS, None, write)
    assert getattr(refused.value, "code", None) == "rate_limiter_unavailable"
