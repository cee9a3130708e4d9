"""Token buckets in the real Redis: burst, refill, Retry-After, several buckets at once, and the
fail-open/fail-closed policy when Redis is unreachable."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.ratelimit import RateLimiter
from services.gateway.redis_guard import GuardedRedis
from services.gateway.settings import RateLimit
from shared.lockout import LoginBackoff
from shared.problems import ServiceUnavailable, TooManyRequests

pytestmark = pytest.mark.anyio


async def test_burst_then_429_with_retry_after(guarded: GuardedRedis, prefix: str) -> None:
    limiter = RateLimiter(guarded, prefix=prefix)
    bucket = limiter.bucket("principal", "alice:search:text", RateLimit(rate=0.5, burst=3))
    for _ in range(3):
        await limiter.hit([bucket], write=False)
    with pytest.raises(TooManyRequests) as raised:
        await limiter.hit([bucket], write=False)
    assert raised.value.status == 429
    assert raised.value.code == "rate_limited"
    assert raised.value.extra == {"limit": "principal"}
    # One token comes back every 2 s at 0.5/s: the client is told to wait that long.
    assert raised.value.headers["Retry-After"] == "2"


async def test_tokens_refill_at_the_rate(guarded: GuardedRedis, prefix: str) -> None:
    limiter = RateLimiter(guarded, prefix=prefix)
    # 2/s: the third request is refused if it comes within 0.5 s of the first, which even a
    # loaded machine manages for three Redis calls (at 20/s the window was only 50 ms).
    bucket = limiter.bucket("ip", "203.0.113.1", RateLimit(rate=2, burst=2))
    first = await limiter.decide([bucket])
    second = await limiter.decide([bucket])
    assert first.allowed and second.allowed
    assert first.remaining == pytest.approx(1, abs=0.1)
    denied = await limiter.decide([bucket])
    assert not denied.allowed
    assert 0 < denied.retry_after <= 0.5 + 0.01
    await asyncio.sleep(1.0)  # 2/s: two tokens back after 1 s
    assert (await limiter.decide([bucket])).allowed
    assert (await limiter.decide([bucket])).allowed


async def test_buckets_are_separate(guarded: GuardedRedis, prefix: str) -> None:
    limiter = RateLimiter(guarded, prefix=prefix)
    limit = RateLimit(rate=0.1, burst=1)
    await limiter.hit([limiter.bucket("principal", "alice:items:read", limit)], write=False)
    await limiter.hit([limiter.bucket("principal", "bob:items:read", limit)], write=False)
    await limiter.hit([limiter.bucket("principal", "alice:search:text", limit)], write=False)
    with pytest.raises(TooManyRequests):
        await limiter.hit([limiter.bucket("principal", "alice:items:read", limit)], write=False)


async def test_several_buckets_are_charged_all_or_none(guarded: GuardedRedis, prefix: str) -> None:
    limiter = RateLimiter(guarded, prefix=prefix)
    roomy = limiter.bucket("principal", "alice:search:text", RateLimit(rate=0.01, burst=5))
    tight = limiter.bucket("ip", "203.0.113.9", RateLimit(rate=0.01, burst=1))
    assert (await limiter.decide([roomy, tight])).allowed
    denied = await limiter.decide([roomy, tight])
    assert not denied.allowed and denied.bucket == tight
    # The refused request took nothing from the roomy bucket: 4 of its 5 tokens are left.
    for _ in range(4):
        assert (await limiter.decide([roomy])).allowed
    assert not (await limiter.decide([roomy])).allowed


async def test_buckets_expire_from_redis(guarded: GuardedRedis, prefix: str) -> None:
    limiter = RateLimiter(guarded, prefix=prefix)
    bucket = limiter.bucket("ip", "203.0.113.2", RateLimit(rate=10, burst=5))
    await limiter.decide([bucket])
    ttl_ms = await guarded.client.pttl(bucket.key)
    # A full refill takes 0.5 s; the key lives about that long plus a second, not forever.
    assert 0 < ttl_ms <= 1500


async def test_redis_down_fails_open_for_reads_and_closed_for_writes(dead: GuardedRedis) -> None:
    limiter = RateLimiter(dead, prefix="x")
    bucket = limiter.bucket("principal", "alice:items:write", RateLimit(rate=1, burst=1))
    for _ in range(3):
        await limiter.hit([bucket], write=False)  # reads pass
    with pytest.raises(ServiceUnavailable) as raised:
        await limiter.hit([bucket], write=True)
    assert raised.value.code == "rate_limiter_unavailable"
    assert raised.value.headers["Retry-After"] == "1"


async def test_fail_policy_is_configurable(dead: GuardedRedis) -> None:
    limiter = RateLimiter(dead, prefix="x", fail_open_reads=False, fail_open_writes=True)
    bucket = limiter.bucket("principal", "alice:search:text", RateLimit(rate=1, burst=1))
    await limiter.hit([bucket], write=True)
    with pytest.raises(ServiceUnavailable):
        await limiter.hit([bucket], write=False)


async def test_stages_are_taken_in_order_as_separate_calls_would(
    guarded: GuardedRedis, prefix: str
) -> None:
    limiter = RateLimiter(guarded, prefix=prefix)
    ip = limiter.bucket("ip", "203.0.113.7", RateLimit(rate=0.01, burst=3))
    tight = limiter.bucket("principal", "alice:search:text", RateLimit(rate=0.01, burst=1))
    assert (await limiter.decide([ip], [tight])).allowed
    # The second stage is refused: the first stays charged.
    denied = await limiter.decide([ip], [tight])
    assert not denied.allowed and denied.bucket == tight
    assert (await limiter.decide([ip])).allowed  # the third and last of the ip bucket's tokens
    # Now the first stage is refused and the second is not looked at.
    other = limiter.bucket("principal", "bob:search:text", RateLimit(rate=0.01, burst=1))
    denied = await limiter.decide([ip], [other])
    assert not denied.allowed and denied.bucket == ip
    assert (await limiter.decide([other])).allowed
    # hit() skips empty stages.
    await limiter.hit(
        [], [limiter.bucket("ip", "203.0.113.8", RateLimit(rate=1, burst=1))], write=False
    )


# -- failed logins per account ----------------------------------------------------------------

BACKOFF = LoginBackoff(free_failures=1, base_seconds=10, max_seconds=40, forget_seconds=600)


async def _locked(limiter: RateLimiter, account: str, policy: LoginBackoff) -> TooManyRequests:
    with pytest.raises(TooManyRequests) as raised:
        await limiter.begin_login(account, policy)
    return raised.value


async def _run_out(guarded: GuardedRedis, limiter: RateLimiter, account: str) -> None:
    """As if the account's lock had run out (Redis's clock cannot be moved)."""
    await guarded.client.hset(limiter.account_key(account), "until", "0")


async def test_an_accounts_lock_doubles_with_each_failure(
    guarded: GuardedRedis, prefix: str
) -> None:
    limiter = RateLimiter(guarded, prefix=prefix)
    await limiter.begin_login("alice", BACKOFF)  # free
    await limiter.begin_login("alice", BACKOFF)  # counted as failed: locks for 10 s
    locked = await _locked(limiter, "alice", BACKOFF)
    assert (locked.status, locked.code) == (429, "rate_limited")
    assert locked.extra == {"limit": "account", "lockout_seconds": 10}
    assert 1 <= int(locked.headers["Retry-After"]) <= 10
    for lockout in (20, 40, 40):  # doubled each time, up to the ceiling
        await _run_out(guarded, limiter, "alice")
        await limiter.begin_login("alice", BACKOFF)
        assert (await _locked(limiter, "alice", BACKOFF)).extra["lockout_seconds"] == lockout
    # Refused attempts are not counted: the lock is still the last one.
    assert (await _locked(limiter, "alice", BACKOFF)).extra["lockout_seconds"] == 40
    # Other accounts are apart.
    await limiter.begin_login("bob", BACKOFF)


async def test_a_success_clears_and_a_refund_gives_back(guarded: GuardedRedis, prefix: str) -> None:
    limiter = RateLimiter(guarded, prefix=prefix)
    attempt = await limiter.begin_login("alice", BACKOFF)
    assert attempt is not None
    await attempt.succeeded()
    assert not await guarded.client.exists(limiter.account_key("alice"))
    await limiter.begin_login("alice", BACKOFF)  # one failure: the free one
    attempt = await limiter.begin_login("alice", BACKOFF)  # would lock, unless given back
    assert attempt is not None
    await attempt.refund()
    attempt = await limiter.begin_login("alice", BACKOFF)
    assert attempt is not None and attempt.failures == 2
    await _locked(limiter, "alice", BACKOFF)


async def test_an_account_is_forgotten_after_a_quiet_while(
    guarded: GuardedRedis, prefix: str
) -> None:
    limiter = RateLimiter(guarded, prefix=prefix)
    policy = BACKOFF.model_copy(update={"forget_seconds": 600})
    await limiter.begin_login("alice", policy)
    ttl = await guarded.client.pttl(limiter.account_key("alice"))
    assert 590_000 < ttl <= 600_000
    await limiter.begin_login("alice", policy)  # locks for 10 s: kept 10 s longer
    ttl = await guarded.client.pttl(limiter.account_key("alice"))
    assert 600_000 < ttl <= 610_000


async def test_account_limit_without_redis_follows_the_read_policy(dead: GuardedRedis) -> None:
    assert await RateLimiter(dead, prefix="x").begin_login("alice", BACKOFF) is None
    closed = RateLimiter(dead, prefix="x", fail_open_reads=False)
    with pytest.raises(ServiceUnavailable):
        await closed.begin_login("alice", BACKOFF)
