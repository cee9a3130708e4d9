"""Redis behind a circuit breaker, so a dead or hanging Redis costs one short timeout and then
nothing: while the breaker is open every Redis use is skipped at once, and after a short
cool-down one call probes whether it is back. Callers catch ``RedisUnavailable`` and degrade
(no cache; rate limits by the fail-open settings)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from shared.http import CircuitBreaker, CircuitOpen

log = logging.getLogger(__name__)

T = TypeVar("T")


class RedisUnavailable(Exception):
    """Redis could not be used for this call (down, slow, or skipped while the breaker is open)."""


def make_redis_client(url: str, timeout: float, password: str | None = None) -> redis.Redis:
    # One immediate retry on a broken connection (a pooled socket from before a Redis restart),
    # none on timeouts, and no backoff sleeps: the breaker does the waiting.
    return redis.Redis.from_url(
        url,
        password=password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )


@dataclass(frozen=True)
class ScriptCall:
    """One Lua script with its keys and arguments, to run alone or with others."""

    script: AsyncScript
    keys: list[str]
    args: list[Any]


async def run_scripts(client: redis.Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    """Several scripts in one round trip (EVALSHA in a pipeline without MULTI), their replies in
    order. Queued through redis-py's pipeline a script would cost a SCRIPT EXISTS round trip on
    every call; here a script Redis does not know (after a restart) is loaded and run again on
    its own, which only happens once."""
    pipeline = client.pipeline(transaction=False)
    for call in calls:
        pipeline.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
    replies = list(await pipeline.execute(raise_on_error=False))
    for i, (reply, call) in enumerate(zip(replies, calls, strict=True)):
        if isinstance(reply, NoScriptError):
            replies[i] = await call.script(keys=call.keys, args=call.args, client=client)
        elif isinstance(reply, Exception):
            raise reply
    return replies


class GuardedRedis:
    def __init__(self, client: redis.Redis, breaker: CircuitBreaker) -> None:
        self.client = client
        self.breaker = breaker

    async def run(self, operation: Callable[[redis.Redis], Awaitable[T]]) -> T:
        try:
            self.breaker.allow()
        except CircuitOpen:
            raise RedisUnavailable("redis is skipped for a moment after failures") from None
        try:
            result = await operation(self.client)
        except (RedisError, OSError, TimeoutError) as exc:
            self.breaker.failure()
            log.warning("redis unavailable: %s", exc)
            raise RedisUnavailable(str(exc)) from exc
        except BaseException:
            self.breaker.abandon()
            raise
        self.breaker.success()
        return result

    async def aclose(self) -> None:
        await self.client.aclose()
