"""Service-to-service authentication on the caller's side (``shared.service_tokens``) against
the real auth app: one fetch for many waiting requests, refresh ahead of expiry in the
background, a pause after a failed refresh, refused credentials as a 503, and the header added
to the calls of a ``ServiceClient`` (a refused token replaced once)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from fastapi.testclient import TestClient

from services.auth.app import create_app as auth_app
from services.retrieval.app import create_app as retrieval_app
from services.retrieval.settings import RetrievalSettings
from shared.contracts.retrieval import RetrievalClient, SearchRequest
from shared.http import ServiceClient
from shared.problems import ProblemError, ServiceUnavailable
from shared.service_auth import DEVELOPMENT_CLIENT_SECRETS
from shared.service_tokens import RETRY_SECONDS, ServiceTokens
from tests.lent import Lent
from tests.service_tokens import KEYS, auth_settings

pytestmark = pytest.mark.anyio

TTL = 100
GATEWAY_SECRET = DEVELOPMENT_CLIENT_SECRETS["gateway"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Switch(httpx.AsyncBaseTransport):
    """The auth app, or a connection refused while ``down``; counts the token requests."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.down = False
        self.token_requests = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            self.token_requests += 1
        if self.down:
            raise httpx.ConnectError("refused", request=request)
        return await self.inner.handle_async_request(request)


@pytest.fixture(scope="module")
def auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = auth_settings(tmp_path_factory.mktemp("auth"), service_token_ttl_seconds=TTL)
    with TestClient(auth_app(settings)) as client:
        yield client


@pytest.fixture
async def auth_transport(auth: TestClient) -> AsyncIterator[Switch]:
    yield Switch(Lent(auth, "auth"))


@pytest.fixture
async def auth_client(auth_transport: Switch) -> AsyncIterator[ServiceClient]:
    client = ServiceClient("auth", "http://auth", transport=auth_transport, retries=0)
    yield client
    await client.aclose()


@pytest.fixture
async def tokens(auth_client: ServiceClient) -> AsyncIterator[tuple[ServiceTokens, Clock]]:
    clock = Clock()
    held = ServiceTokens(auth_client, "gateway", GATEWAY_SECRET, clock=clock)
    yield held, clock
    await held.aclose()


async def _settle() -> None:
    # Let a background refresh (a task) run to its end.
    for _ in range(20):
        await asyncio.sleep(0)


async def test_one_fetch_serves_every_waiting_request_and_is_reused(
    tokens: tuple[ServiceTokens, Clock], auth_transport: Switch
) -> None:
    held, _ = tokens
    values = await asyncio.gather(*(held.token("retrieval") for _ in range(20)))
    assert len(set(values)) == 1 and auth_transport.token_requests == 1
    assert await held.token("retrieval") == values[0]
    assert auth_transport.token_requests == 1
    claims = jwt.decode(values[0], options={"verify_signature": False})
    assert (claims["sub"], claims["aud"]) == ("gateway", "crossmodal:retrieval")
    assert claims["scope"].split() == ["retrieval:read", "retrieval:search", "retrieval:write"]
    assert claims["exp"] - claims["iat"] == TTL
    # Each service has its own token.
    feature = await held.token("feature")
    assert feature != values[0] and auth_transport.token_requests == 2


async def test_a_token_is_refreshed_in_the_background_ahead_of_expiry(
    tokens: tuple[ServiceTokens, Clock], auth_transport: Switch
) -> None:
    held, clock = tokens
    first = await held.token("metadata")
    clock.now += 0.74 * TTL
    assert await held.token("metadata") == first and auth_transport.token_requests == 1
    clock.now += 0.02 * TTL  # past three quarters: the request goes on with the held token...
    assert await held.token("metadata") == first
    await _settle()  # ... while the new one is fetched
    assert auth_transport.token_requests == 2
    second = await held.token("metadata")
    assert second != first


async def test_near_expiry_a_request_waits_for_a_new_token(
    tokens: tuple[ServiceTokens, Clock], auth_transport: Switch
) -> None:
    held, clock = tokens
    first = await held.token("metadata")
    clock.now += 0.95 * TTL
    second = await held.token("metadata")
    assert second != first and auth_transport.token_requests == 2


async def test_a_failed_refresh_is_tried_again_after_a_pause(
    tokens: tuple[ServiceTokens, Clock], auth_transport: Switch
) -> None:
    held, clock = tokens
    first = await held.token("feature")
    auth_transport.down = True
    clock.now += 0.8 * TTL
    assert await held.token("feature") == first  # auth away: the held token still serves
    await _settle()
    assert auth_transport.token_requests == 2
    clock.now += RETRY_SECONDS / 2
    assert await held.token("feature") == first
    await _settle()
    assert auth_transport.token_requests == 2  # no new try yet
    auth_transport.down = False
    clock.now += RETRY_SECONDS
    assert await held.token("feature") == first
    await _settle()
    assert auth_transport.token_requests == 3
    assert await held.token("feature") != first
    # Past nine tenths with auth away: the request fails with the auth client's 503.
    auth_transport.down = True
    clock.now += 0.95 * TTL
    with pytest.raises(ServiceUnavailable) as raised:
        await held.token("feature")
    assert raised.value.code == "auth_unavailable"


async def test_refused_credentials_are_this_deployment_s_fault(
    auth_client: ServiceClient,
) -> None:
    wrong = ServiceTokens(auth_client, "gateway", "not-the-secret-of-the-gateway")
    with pytest.raises(ServiceUnavailable) as raised:
        await wrong.token("retrieval")
    assert raised.value.code == "service_auth_failed"
    assert "invalid_client" in raised.value.detail
    # A caller asking for a service it does not call is refused the same way.
    reconcile = ServiceTokens(auth_client, "reconcile", DEVELOPMENT_CLIENT_SECRETS["reconcile"])
    with pytest.raises(ServiceUnavailable) as raised:
        await reconcile.token("auth")
    assert raised.value.code == "service_auth_failed" and "invalid_target" in raised.value.detail


async def test_a_service_client_calls_the_real_service_with_its_token(
    tokens: tuple[ServiceTokens, Clock], auth_client: ServiceClient, tmp_path: Path
) -> None:
    held, _ = tokens
    app = retrieval_app(RetrievalSettings(data_dir=tmp_path), token_keys=KEYS)
    with TestClient(app) as retrieval:
        plain = RetrievalClient(ServiceClient("retrieval", "http://r", transport=Lent(retrieval)))
        with pytest.raises(ProblemError) as refused:
            await plain.collections()
        assert (refused.value.status, refused.value.code) == (401, "missing_token")
        client = RetrievalClient(
            ServiceClient(
                "retrieval",
                "http://r",
                transport=Lent(retrieval),
                credentials=held.credentials("retrieval"),
            )
        )
        assert (await client.collections()).collections == []
        reconcile = ServiceTokens(auth_client, "reconcile", DEVELOPMENT_CLIENT_SECRETS["reconcile"])
        operator = RetrievalClient(
            ServiceClient(
                "retrieval",
                "http://r",
                transport=Lent(retrieval),
                credentials=reconcile.credentials("retrieval"),
            )
        )
        assert (await operator.collections()).collections == []
        # The operator tools' token has no retrieval:search: the refusal is a 503 (this
        # deployment's fault), not the user's 403.
        query = SearchRequest(modality="image", vectors=[[1.0, 0.0]], top_k=1)
        with pytest.raises(ServiceUnavailable) as raised:
            await operator.search("c", query)
        assert raised.value.code == "retrieval_error" and "retrieval:search" in raised.value.detail
        for api in (plain, client, operator):
            await api.aclose()
        await reconcile.aclose()


async def test_the_header_is_added_only_where_no_credentials_are_and_a_refusal_renews_it(
    tokens: tuple[ServiceTokens, Clock], auth_transport: Switch
) -> None:
    held, _ = tokens
    seen: list[str | None] = []
    refuse_first = [True]

    def callee(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        if request.url.path == "/refuse-once" and refuse_first[0]:
            refuse_first[0] = False
            return httpx.Response(401, json={"detail": "the token has expired"})
        if request.url.path == "/always-refused":
            return httpx.Response(401, json={"detail": "the token is invalid"})
        return httpx.Response(200, json={})

    client = ServiceClient(
        "metadata",
        "http://m",
        transport=httpx.MockTransport(callee),
        credentials=held.credentials("metadata"),
    )
    await client.request("GET", "/items/1")
    await client.request("GET", "/items/1", headers={"Authorization": "Bearer a-user-token"})
    await client.request("GET", "/readyz")
    token = seen[0]
    assert token is not None and token.startswith("Bearer ey")
    assert seen[1:] == ["Bearer a-user-token", None]
    fetched = auth_transport.token_requests
    # A token the service refuses is dropped, and the request sent once more with a new one.
    await client.request("POST", "/refuse-once", retry=False)
    assert seen[-2] == token and seen[-1] not in (None, token)
    assert auth_transport.token_requests == fetched + 1
    with pytest.raises(ServiceUnavailable) as raised:
        await client.request("GET", "/always-refused")
    assert raised.value.code == "metadata_error" and "the token is invalid" in raised.value.detail
    await client.aclose()
