"""Password guessing at ``POST /auth/token``, against a real auth service and a real gateway, each
served by uvicorn on a socket exactly as ``shared.app.serve`` runs them (the client address, and
so the per-IP limit, is uvicorn's business), with the real Redis.

A rotating ``X-Forwarded-For`` gets no fresh bucket unless the peer is a configured proxy; the
failures of an account are counted from every address together, with an exponential lock-out
that a success clears."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI

from services.auth.app import create_app as create_auth
from services.auth.settings import AuthSettings
from services.gateway.app import create_app as create_gateway
from services.gateway.settings import GatewaySettings, RateLimit
from shared.app import uvicorn_options
from shared.lockout import LoginBackoff
from shared.service_auth import DEVELOPMENT_CLIENT_SECRETS
from tests.services.gateway.conftest import REDIS_URL, dead_redis_url

pytestmark = pytest.mark.anyio

PASSWORDS = {"alice": "alice-password-1", "bob": "bob-password-12", "carol": "carol-password-1"}
# Long locks: a lock must still hold when the next request comes, however slow the machine.
BACKOFF = LoginBackoff(free_failures=2, base_seconds=30, max_seconds=120)
_addresses = (f"198.51.100.{n % 250 + 1}" for n in itertools.count())


def another_address() -> dict[str, str]:
    return {"X-Forwarded-For": next(_addresses)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def serving(factory: Callable[[], FastAPI], options: dict[str, Any]) -> AsyncIterator[str]:
    server = uvicorn.Server(uvicorn.Config(factory, factory=True, **options))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the server did not start"
        await asyncio.sleep(0.02)
    try:
        yield f"http://{options['host']}:{options['port']}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "signing-key.pem"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


@pytest.fixture
async def auth_url(tmp_path: Path, signing_key: Path) -> AsyncIterator[str]:
    settings = AuthSettings(
        port=free_port(),
        database_url=f"sqlite:///{tmp_path / 'auth.db'}",
        private_key_path=signing_key,
        argon2_time_cost=1,
        argon2_memory_kib=64,
        bootstrap_users=[
            {"username": name, "password": password, "scopes": ["search:text"]}
            for name, password in PASSWORDS.items()
        ],
        # The gateway's limit is under test here; the service's own one has its tests.
        login_backoff=LoginBackoff(free_failures=100),
    )
    async with serving(lambda: create_auth(settings), uvicorn_options(settings)) as url:
        yield url


@pytest.fixture
def gateway_at(auth_url: str, prefix: str) -> Callable[..., AbstractAsyncContextManager[str]]:
    """A gateway in front of that auth service: ``async with gateway_at(trusted_proxies=...)``."""

    def start(
        *, trusted_proxies: tuple[str, ...] = (), **overrides: Any
    ) -> AbstractAsyncContextManager[str]:
        settings = GatewaySettings(
            **{
                "port": free_port(),
                "auth_url": auth_url,
                "redis_url": REDIS_URL,
                "cache_prefix": prefix,
                "token_rate_limit": RateLimit(rate=0.001, burst=3),
                "login_backoff": BACKOFF,
                "trusted_proxies": trusted_proxies,
                **overrides,
            }
        )
        options = uvicorn_options(settings, trusted_proxies=settings.trusted_proxies)
        return serving(lambda: create_gateway(settings), options)

    return start


async def login(
    client: httpx.AsyncClient, username: str, password: str, headers: dict[str, str]
) -> httpx.Response:
    data = {"grant_type": "password", "username": username, "password": password}
    return await client.post("/auth/token", data=data, headers=headers)


@pytest.fixture
def names() -> Iterator[str]:
    # Unknown names: the per-account limit never meets the same one twice.
    return (f"guess-{n}" for n in itertools.count())


async def test_a_rotating_forwarded_for_from_an_untrusted_peer_gets_no_fresh_bucket(
    gateway_at: Any, names: Iterator[str]
) -> None:
    async with gateway_at() as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        for _ in range(3):  # the burst of the token endpoints
            response = await login(client, next(names), "guess", another_address())
            assert response.status_code == 401, response.text
        refused = await login(client, next(names), "guess", another_address())
    assert refused.status_code == 429
    assert refused.json()["limit"] == "token"
    assert int(refused.headers["retry-after"]) >= 1


async def test_a_trusted_proxys_forwarded_for_is_the_client_address(
    gateway_at: Any, names: Iterator[str]
) -> None:
    async with (
        gateway_at(trusted_proxies=("127.0.0.1",)) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        # Each address has its own bucket...
        for _ in range(5):
            response = await login(client, next(names), "guess", another_address())
            assert response.status_code == 401, response.text
        # ...and one address still has only its burst.
        one = another_address()
        for _ in range(3):
            assert (await login(client, next(names), "guess", one)).status_code == 401
        refused = await login(client, next(names), "guess", one)
    assert refused.status_code == 429
    assert refused.json()["limit"] == "token"


async def test_an_accounts_failures_count_from_every_address(gateway_at: Any) -> None:
    async with (
        gateway_at(trusted_proxies=("127.0.0.1",)) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        for _ in range(3):  # two free failures, and the third locks the account for 30 s
            assert (await login(client, "alice", "guess", another_address())).status_code == 401
        # From yet another address, with the right password: refused before auth is asked.
        refused = await login(client, "alice", PASSWORDS["alice"], another_address())
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.headers["cache-control"] == "no-store"
        assert 1 <= int(refused.headers["retry-after"]) <= 30
        body = refused.json()
        assert (body["code"], body["limit"], body["lockout_seconds"]) == (
            "rate_limited",
            "account",
            30,
        )
        # Another account is not locked.
        assert (await login(client, "bob", PASSWORDS["bob"], another_address())).status_code == 200


async def test_a_success_clears_the_failures(gateway_at: Any) -> None:
    async with (
        gateway_at(trusted_proxies=("127.0.0.1",)) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        for _ in range(2):
            assert (await login(client, "carol", "guess", another_address())).status_code == 401
        ok = await login(client, "carol", PASSWORDS["carol"], another_address())
        assert ok.status_code == 200
        # Counted on from two, the next failure would lock and the one after be refused.
        for _ in range(3):
            assert (await login(client, "carol", "guess", another_address())).status_code == 401
        assert (await login(client, "carol", "guess", another_address())).status_code == 429


async def test_a_request_auth_refuses_unread_is_not_a_failure(gateway_at: Any) -> None:
    async with (
        gateway_at(trusted_proxies=("127.0.0.1",)) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        for _ in range(4):  # an unknown scope: refused before any password is checked
            response = await client.post(
                "/auth/token",
                data={"grant_type": "password", "username": "bob", "password": "x", "scope": "y"},
                headers=another_address(),
            )
            assert response.status_code == 400, response.text
        assert (await login(client, "bob", PASSWORDS["bob"], another_address())).status_code == 200


async def test_without_redis_logins_follow_the_read_policy(gateway_at: Any) -> None:
    # No per-IP limit: the account's is the only one asking Redis.
    async with (
        gateway_at(redis_url=dead_redis_url(), token_rate_limit=None) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        # Reads fail open by default: logins go on (the auth service still counts its own).
        assert (await login(client, "bob", PASSWORDS["bob"], {})).status_code == 200
    async with (
        gateway_at(redis_url=dead_redis_url(), token_rate_limit=None, fail_open_reads=False) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        refused = await login(client, "bob", PASSWORDS["bob"], {})
    assert refused.status_code == 503
    assert refused.json()["code"] == "rate_limiter_unavailable"


async def test_service_tokens_are_not_issued_through_the_gateway(
    gateway_at: Any, auth_url: str
) -> None:
    # The gateway's own client credentials, asking for a token for an internal service.
    form = {
        "grant_type": "client_credentials",
        "client_id": "gateway",
        "client_secret": DEVELOPMENT_CLIENT_SECRETS["gateway"],
        "audience": "crossmodal:metadata",
    }
    async with httpx.AsyncClient(base_url=auth_url, timeout=30) as client:
        assert (await client.post("/token", data=form)).status_code == 200  # auth issues it
    async with (
        gateway_at() as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        refused = await client.post("/auth/token", data=form)
    assert refused.status_code == 400, refused.text
    assert refused.json()["code"] == "invalid_request" and "access_token" not in refused.text
    assert refused.headers["cache-control"] == "no-store"
