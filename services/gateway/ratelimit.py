"""Rate limiting in Redis: token buckets, checked and taken atomically by one Lua script.

Buckets: per client IP (every scoped request, before the token is even checked), per client IP
on the token endpoints (password guessing), and per principal and scope (limits per scope are
configurable). Several gateway replicas share the buckets; the script reads the time from
Redis, so replicas with skewed clocks still agree.

Password logins are limited per account as well, from every address together: the failures of
each account, with an exponential lock-out (``shared.lockout``), in Redis by two more scripts.

When Redis cannot be used the decision follows the fail-open settings: by default reads pass
(a search without a rate limit beats no search) and writes are refused with a 503
``rate_limiter_unavailable`` (they would also skip the cache invalidation Redis holds).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter
from redis.commands.core import AsyncScript

from services.gateway.redis_guard import GuardedRedis, RedisUnavailable, ScriptCall
from services.gateway.settings import RateLimit
from shared.lockout import LoginBackoff, account_locked
from shared.problems import ServiceUnavailable, TooManyRequests

log = logging.getLogger(__name__)

RATE_LIMITED = Counter(
    "gateway_rate_limited_total", "Requests refused with 429, by bucket kind.", ["bucket"]
)
RATE_LIMIT_UNCHECKED = Counter(
    "gateway_rate_limit_unchecked_total",
    "Requests whose rate limit could not be checked (Redis unavailable), by outcome.",
    ["outcome"],
)
for _bucket in ("ip", "token", "principal", "account"):
    RATE_LIMITED.labels(_bucket)
for _outcome in ("allowed", "refused"):
    RATE_LIMIT_UNCHECKED.labels(_outcome)

# KEYS: the buckets. ARGV: rate and burst of each bucket in turn, then the cost, then the number of
# buckets in each stage (none: one stage of them all). A bucket is a hash {tokens, ts}; a missing
# one is full. Stages are taken in order, each as a whole: either every bucket of the stage has
# the tokens and all are charged, or none is and the reply says how long until the emptiest one
# has them (the stages before stay charged, the ones after are not looked at), exactly as one
# call per stage would do.
TOKEN_BUCKET_LUA = """
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local n = #KEYS
local cost = tonumber(ARGV[2 * n + 1])
local sizes = {}
for j = 2 * n + 2, #ARGV do
  sizes[#sizes + 1] = tonumber(ARGV[j])
end
if #sizes == 0 then
  sizes[1] = n
end
local remaining = -1
local first = 1
for _, size in ipairs(sizes) do
  local last = first + size - 1
  local levels = {}
  local wait, denied = 0, 0
  for i = first, last do
    local rate, burst = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
    local state = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
    local tokens, ts = tonumber(state[1]), tonumber(state[2])
    if tokens == nil or ts == nil then
      tokens, ts = burst, now
    end
    tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
    levels[i] = tokens
    if tokens < cost and (cost - tokens) / rate > wait then
      wait, denied = (cost - tokens) / rate, i
    end
  end
  if denied > 0 then
    return {0, tostring(wait), denied}
  end
  for i = first, last do
    local rate, burst = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
    local left = levels[i] - cost
    redis.call('HSET', KEYS[i], 'tokens', tostring(left), 'ts', tostring(now))
    redis.call('PEXPIRE', KEYS[i], math.ceil(burst / rate * 1000) + 1000)
    if remaining < 0 or left < remaining then
      remaining = left
    end
  end
  first = last + 1
end
return {1, tostring(remaining), 0}
"""


# KEYS[1]: an account's failures, a hash {failures, until, lockout}. ARGV: the free failures, the
# seconds to remember them, then the lock of each failure past the free ones (the last for every
# later one). While locked: {0, seconds left, lockout}, nothing counted. Else the attempt is counted
# as a failure before its password is checked (the caller clears or refunds it when it was not
# one): {1, failures now, until and lockout before}.
LOGIN_BEGIN_LUA = """
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'failures', 'until', 'lockout')
local failures = tonumber(state[1]) or 0
local locked_until = tonumber(state[2]) or 0
local lockout = tonumber(state[3]) or 0
if now < locked_until then
  return {0, tostring(locked_until - now), tostring(lockout)}
end
failures = failures + 1
local new_until, new_lockout = locked_until, lockout
local beyond = failures - tonumber(ARGV[1])
if beyond > 0 then
  new_lockout = tonumber(ARGV[2 + math.min(beyond, #ARGV - 2)])
  new_until = now + new_lockout
end
redis.call('HSET', KEYS[1], 'failures', failures, 'until', tostring(new_until),
  'lockout', tostring(new_lockout))
local ttl = math.max(new_until - now, 0) + tonumber(ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000))
return {1, failures, tostring(locked_until), tostring(lockout)}
"""
# KEYS[1]: as above. ARGV: the failures an attempt counted, and the until and lockout before it.
# Gives the attempt back unless another one was counted since (that one then stands).
LOGIN_REFUND_LUA = """
local failures = tonumber(redis.call('HGET', KEYS[1], 'failures'))
if failures == nil or failures ~= tonumber(ARGV[1]) then
  return 0
end
if failures <= 1 then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'failures', failures - 1, 'until', ARGV[2], 'lockout', ARGV[3])
end
return 1
"""


@dataclass(frozen=True)
class Bucket:
    kind: str  # "ip", "token" or "principal": the metric label and the problem's ``limit``
    key: str
    limit: RateLimit


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float
    remaining: float
    bucket: Bucket | None


class RateLimiter:
    def __init__(
        self,
        redis: GuardedRedis,
        *,
        prefix: str,
        fail_open_reads: bool = True,
        fail_open_writes: bool = False,
    ) -> None:
        self._redis = redis
        self._prefix = f"{prefix}:rl"
        self.fail_open_reads = fail_open_reads
        self.fail_open_writes = fail_open_writes
        self._script: AsyncScript = redis.client.register_script(TOKEN_BUCKET_LUA)
        self._login_begin: AsyncScript = redis.client.register_script(LOGIN_BEGIN_LUA)
        self._login_refund: AsyncScript = redis.client.register_script(LOGIN_REFUND_LUA)

    def bucket(self, kind: str, name: str, limit: RateLimit) -> Bucket:
        return Bucket(kind, f"{self._prefix}:{kind}:{name}", limit)

    def charge(self, *stages: list[Bucket], write: bool) -> Charge | None:
        """The charge of one request to the buckets of ``stages`` (one stage after the other, as
        ``decide`` does), to take now (``Charge.take``) or in the same round trip as other
        Redis work (``Charge.call`` and ``Charge.settle``); None when no bucket applies."""
        stages = tuple(stage for stage in stages if stage)
        return Charge(self, stages, write) if stages else None

    def _call(self, stages: tuple[list[Bucket], ...], cost: int) -> ScriptCall:
        buckets = [bucket for stage in stages for bucket in stage]
        args: list[float | int] = []
        for bucket in buckets:
            args += [bucket.limit.rate, bucket.limit.burst]
        args.append(cost)
        if len(stages) > 1:
            args += [len(stage) for stage in stages]
        return ScriptCall(self._script, [b.key for b in buckets], args)

    @staticmethod
    def _decision(stages: tuple[list[Bucket], ...], reply: Any) -> Decision:
        allowed, value, denied = reply
        if int(allowed):
            return Decision(True, 0.0, float(value), None)
        buckets = [bucket for stage in stages for bucket in stage]
        return Decision(False, float(value), 0.0, buckets[int(denied) - 1])

    async def decide(self, *stages: list[Bucket], cost: int = 1) -> Decision:
        """Take ``cost`` tokens from every bucket of each stage in turn, or from none of a
        stage (and stop there): one round trip. Raises ``RedisUnavailable``."""
        call = self._call(stages, cost)
        reply = await self._redis.run(
            lambda r: call.script(keys=call.keys, args=call.args, client=r)
        )
        return self._decision(stages, reply)

    def unavailable(self, *, write: bool) -> None:
        """Redis could not be used: pass, or refuse with a 503, as the fail-open setting for
        reads or writes says."""
        if self.fail_open_writes if write else self.fail_open_reads:
            RATE_LIMIT_UNCHECKED.labels("allowed").inc()
            return
        RATE_LIMIT_UNCHECKED.labels("refused").inc()
        raise ServiceUnavailable(
            "the rate limiter is unavailable; writes are refused until it is back",
            code="rate_limiter_unavailable",
            headers={"Retry-After": "1"},
        )

    def account_key(self, account: str) -> str:
        # Hashed: a name can be long and hold anything; the key is only ever looked up.
        digest = hashlib.sha256(account.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return f"{self._prefix}:account:{digest}"

    async def begin_login(self, account: str, policy: LoginBackoff) -> LoginAttempt | None:
        """Count a password login of ``account`` as failed, before its password is checked, or
        refuse it with a 429 while the account is locked. The caller settles the attempt once
        the outcome is known. None: Redis is unavailable and reads fail open (the auth service
        still counts for itself)."""
        key = self.account_key(account)
        args = [policy.free_failures, policy.forget_seconds, *policy.steps()]
        try:
            reply = await self._redis.run(
                lambda r: self._login_begin(keys=[key], args=args, client=r)
            )
        except RedisUnavailable:
            self.unavailable(write=False)
            return None
        if not int(reply[0]):
            RATE_LIMITED.labels("account").inc()
            raise account_locked(
                float(reply[1]), float(reply[2]), headers={"Cache-Control": "no-store"}
            )
        return LoginAttempt(self, key, int(reply[1]), _text(reply[2]), _text(reply[3]))

    async def hit(self, *stages: list[Bucket], write: bool) -> None:
        """Charge one request to the buckets of ``stages``: 429 when one is empty; when Redis
        is unavailable, pass or refuse (503) as the fail-open setting for reads or writes says."""
        charge = self.charge(*stages, write=write)
        if charge is not None:
            await charge.take()


@dataclass
class Charge:
    """One request's rate-limit charge. ``take`` sends it alone; a caller that talks to Redis
    anyway sends ``call`` in its own round trip and hands the reply to ``settle`` (or calls
    ``unavailable`` when Redis failed): the outcome is the same either way."""

    limiter: RateLimiter
    stages: tuple[list[Bucket], ...]
    write: bool
    settled: bool = False

    def call(self) -> ScriptCall:
        return self.limiter._call(self.stages, 1)

    async def take(self) -> None:
        try:
            decision = await self.limiter.decide(*self.stages)
        except RedisUnavailable:
            self.unavailable()
            return
        self._apply(decision)

    def settle(self, reply: Any) -> None:
        self._apply(self.limiter._decision(self.stages, reply))

    def unavailable(self) -> None:
        self.settled = True
        self.limiter.unavailable(write=self.write)

    def _apply(self, decision: Decision) -> None:
        self.settled = True
        if decision.allowed:
            return
        assert decision.bucket is not None
        RATE_LIMITED.labels(decision.bucket.kind).inc()
        retry_after = max(1, math.ceil(decision.retry_after))
        raise TooManyRequests(
            f"too many requests ({decision.bucket.kind} limit: {decision.bucket.limit.burst} "
            f"at once, {decision.bucket.limit.rate:g}/s); retry in {retry_after}s",
            code="rate_limited",
            headers={"Retry-After": str(retry_after)},
            extra={"limit": decision.bucket.kind},
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class LoginAttempt:
    """A password login counted as failed in its account's record: a success clears the record,
    an answer that says nothing of the password (a malformed request, an error) gives the attempt
    back; a failure leaves it counted. When Redis fails meanwhile the count stays as it is."""

    limiter: RateLimiter
    key: str
    failures: int
    until_before: str
    lockout_before: str

    async def succeeded(self) -> None:
        try:
            await self.limiter._redis.run(lambda r: r.delete(self.key))
        except RedisUnavailable:
            log.warning("a login's failure count could not be cleared (redis unavailable)")

    async def refund(self) -> None:
        args = [self.failures, self.until_before, self.lockout_before]
        try:
            await self.limiter._redis.run(
                lambda r: self.limiter._login_refund(keys=[self.key], args=args, client=r)
            )
        except RedisUnavailable:
            log.warning("a login attempt could not be given back (redis unavailable)")
