"""The gateway's revocation list against the real auth app (in process): revocations reach it
with the next poll; when the auth service is away the last copy is used, and past the maximum
staleness writes are refused while reads go on (by default)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
from fastapi.testclient import TestClient

from services.auth.app import create_app
from services.auth.scopes import KNOWN_SCOPES
from services.auth.settings import AuthSettings
from services.gateway.revocations import RevocationList
from shared.contracts.auth import AuthClient
from shared.http import ServiceClient
from shared.problems import ServiceUnavailable, Unauthorized
from shared.service_auth import DEVELOPMENT_CLIENT_SECRETS
from shared.service_tokens import ServiceTokens
from shared.tokens import Principal, TokenVerifier

pytestmark = pytest.mark.anyio


@pytest.fixture
def auth_settings(tmp_path: Any) -> AuthSettings:
    return AuthSettings(
        database_url=f"sqlite:///{tmp_path / 'auth.db'}",
        private_key_path=tmp_path / "key.pem",
        argon2_time_cost=1,
        argon2_memory_kib=64,
        bootstrap_users=[
            {"username": "demo", "password": "demo-password", "scopes": list(KNOWN_SCOPES)}
        ],
    )


@pytest.fixture
def auth_app(auth_settings: AuthSettings) -> Any:
    with TestClient(create_app(auth_settings)) as client:
        yield client


@pytest.fixture
async def auth_client(auth_app: TestClient) -> AsyncIterator[ServiceClient]:
    client = ServiceClient("auth", "http://auth", transport=httpx.ASGITransport(app=auth_app.app))
    yield client
    await client.aclose()


@pytest.fixture
async def feed_client(
    auth_app: TestClient, auth_client: ServiceClient
) -> AsyncIterator[ServiceClient]:
    """What the gateway polls the feed with: its service token for auth on every call, from
    the client-credentials grant of this auth app."""
    tokens = ServiceTokens(auth_client, "gateway", DEVELOPMENT_CLIENT_SECRETS["gateway"])
    client = ServiceClient(
        "auth",
        "http://auth",
        transport=httpx.ASGITransport(app=auth_app.app),
        credentials=tokens.credentials("auth"),
    )
    yield client
    await tokens.aclose()
    await client.aclose()


def _login(auth_app: TestClient) -> dict[str, Any]:
    response = auth_app.post(
        "/token",
        data={"grant_type": "password", "username": "demo", "password": "demo-password"},
    )
    assert response.status_code == 200
    return response.json()


def _admin(auth_app: TestClient) -> dict[str, str]:
    return {"Authorization": f"Bearer {_login(auth_app)['access_token']}"}


# memo_size 4096: the gateway's verifier, which remembers verified tokens (never their
# revocation check).
@pytest.mark.parametrize("memo_size", [0, 4096])
async def test_a_revoked_token_is_refused_after_the_next_poll(
    auth_app: TestClient, auth_client: ServiceClient, feed_client: ServiceClient, memo_size: int
) -> None:
    revocations = RevocationList(AuthClient(feed_client))
    verifier = TokenVerifier(
        auth_client,
        issuer="crossmodal-auth",
        audience="crossmodal-gateway",
        revocations=revocations,
        memo_size=memo_size,
    )
    token = _login(auth_app)["access_token"]
    await revocations.poll()
    assert (await verifier.verify(token)).subject == "demo"
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    response = auth_app.post("/admin/revocations", headers=_admin(auth_app), json={"jti": jti})
    assert response.status_code == 201
    assert (await verifier.verify(token)).subject == "demo"  # not polled yet
    await revocations.poll()
    with pytest.raises(Unauthorized) as raised:
        await verifier.verify(token)
    assert raised.value.code == "token_revoked"


async def test_revoking_a_subject_refuses_its_older_tokens_only(
    auth_app: TestClient, feed_client: ServiceClient
) -> None:
    revocations = RevocationList(AuthClient(feed_client))
    old = _login(auth_app)["access_token"]
    admin = _admin(auth_app)
    await revocations.poll()  # a first full copy, then incremental ones
    assert auth_app.post("/admin/principals/demo/revoke-tokens", headers=admin).status_code == 200
    await revocations.poll()
    claims = jwt.decode(old, options={"verify_signature": False})
    with pytest.raises(Unauthorized):
        await revocations.check(Principal("demo", frozenset(), claims["jti"], claims["iat"]))
    time.sleep(1.05)  # not_before is the next whole second after the revocation
    fresh = jwt.decode(_login(auth_app)["access_token"], options={"verify_signature": False})
    await revocations.check(Principal("demo", frozenset(), fresh["jti"], fresh["iat"]))


async def test_a_full_resync_drops_nothing_still_live(
    auth_app: TestClient, feed_client: ServiceClient
) -> None:
    revocations = RevocationList(
        AuthClient(feed_client), resync_seconds=0
    )  # every poll is a full one
    admin = _admin(auth_app)
    auth_app.post("/admin/revocations", headers=admin, json={"jti": "j-1"})
    await revocations.poll()
    await revocations.poll()
    with pytest.raises(Unauthorized):
        await revocations.check(Principal("x", frozenset(), "j-1", int(time.time())))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_stale_list_fails_closed_for_writes_and_open_for_reads() -> None:
    unreachable = ServiceClient("auth", "http://127.0.0.1:9", retries=0)
    clock = Clock()
    revocations = RevocationList(AuthClient(unreachable), max_staleness=60, clock=clock)
    with pytest.raises(ServiceUnavailable):
        await revocations.poll()
    revocations.ensure_fresh(write=True)  # a fresh start counts as fresh
    clock.now = 61
    revocations.ensure_fresh(write=False)
    with pytest.raises(ServiceUnavailable) as raised:
        revocations.ensure_fresh(write=True)
    assert raised.value.code == "revocations_unavailable"
    assert raised.value.headers["Retry-After"]
    strict = RevocationList(
        AuthClient(unreachable), max_staleness=60, fail_open_reads=False, clock=clock
    )
    clock.now = 200
    with pytest.raises(ServiceUnavailable):
        strict.ensure_fresh(write=False)
    await unreachable.aclose()


async def test_polling_again_makes_the_list_fresh(feed_client: ServiceClient) -> None:
    clock = Clock()
    revocations = RevocationList(AuthClient(feed_client), max_staleness=60, clock=clock)
    clock.now = 100
    with pytest.raises(ServiceUnavailable):
        revocations.ensure_fresh(write=True)
    await revocations.poll()
    revocations.ensure_fresh(write=True)
    assert revocations.age == 0
