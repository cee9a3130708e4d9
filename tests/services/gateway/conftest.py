"""Fixtures of the gateway tests: the real Redis on 127.0.0.1:6379 under a unique key prefix
(removed afterwards, never a FLUSHALL), and a Redis address where nothing listens."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from services.gateway.redis_guard import GuardedRedis, make_redis_client
from shared.http import CircuitBreaker

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def prefix() -> Iterator[str]:
    prefix = f"test-gw-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
async def guarded() -> AsyncIterator[GuardedRedis]:
    guard = GuardedRedis(
        make_redis_client(REDIS_URL, 0.5),
        CircuitBreaker(f"redis-{uuid.uuid4().hex[:6]}", failure_threshold=1, reset_seconds=60),
    )
    yield guard
    await guard.aclose()


def dead_redis_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


@pytest.fixture
async def dead() -> AsyncIterator[GuardedRedis]:
    guard = GuardedRedis(
        make_redis_client(dead_redis_url(), 0.5),
        CircuitBreaker(f"redis-{uuid.uuid4().hex[:6]}", failure_threshold=1, reset_seconds=60),
    )
    yield guard
    await guard.aclose()
