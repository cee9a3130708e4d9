"""The calling services' client-credentials grant (``audience=crossmodal:<service>``): each
caller gets a short-lived token for the services it calls with the scopes ``CALLERS`` gives it,
and nothing else does; the revocation feed takes such a token only."""

from __future__ import annotations

from typing import Any

import jwt
import pytest
from fastapi.testclient import TestClient

from services.auth.app import create_app
from services.auth.settings import AuthSettings
from shared.service_auth import CALLERS, DEVELOPMENT_CLIENT_SECRETS, audience
from tests.service_tokens import granted_headers
from tests.services.auth.conftest import CLIENT_ID, CLIENT_SECRET


def _grant(client: TestClient, caller: str, secret: str, **fields: str) -> Any:
    return client.post(
        "/token",
        data={"grant_type": "client_credentials", **fields},
        auth=(caller, secret),
    )


def _claims(client: TestClient, token: str, service: str) -> dict[str, Any]:
    (jwk,) = client.get("/.well-known/jwks.json").json()["keys"]
    key = jwt.PyJWK.from_dict(jwk)
    return jwt.decode(  # type: ignore[no-any-return]
        token, key.key, algorithms=["RS256"], audience=audience(service), issuer="crossmodal-auth"
    )


@pytest.mark.parametrize(
    ("caller", "service"),
    [(caller, service) for caller, services in CALLERS.items() for service in services],
)
def test_each_caller_gets_its_scopes_for_each_service_it_calls(
    client: TestClient, settings: AuthSettings, caller: str, service: str
) -> None:
    response = _grant(
        client, caller, DEVELOPMENT_CLIENT_SECRETS[caller], audience=audience(service)
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "refresh_token" not in body
    assert body["expires_in"] == settings.service_token_ttl_seconds
    claims = _claims(client, body["access_token"], service)
    assert (claims["sub"], claims["aud"]) == (caller, f"crossmodal:{service}")
    assert set(claims["scope"].split()) == CALLERS[caller][service]
    assert claims["exp"] - claims["iat"] == settings.service_token_ttl_seconds


def test_a_caller_may_ask_for_fewer_scopes_never_more(client: TestClient) -> None:
    secret = DEVELOPMENT_CLIENT_SECRETS["reconcile"]
    narrow = _grant(
        client, "reconcile", secret, audience="crossmodal:retrieval", scope="retrieval:read"
    )
    assert narrow.status_code == 200
    assert narrow.json()["scope"] == "retrieval:read"
    wider = _grant(
        client, "reconcile", secret, audience="crossmodal:retrieval", scope="retrieval:search"
    )
    assert (wider.status_code, wider.json()["code"]) == (400, "invalid_scope")


@pytest.mark.parametrize(
    ("caller", "secret", "target", "status", "code"),
    [
        ("gateway", "a-wrong-secret", "crossmodal:retrieval", 401, "invalid_client"),
        ("nobody", "a-wrong-secret", "crossmodal:retrieval", 401, "invalid_client"),
        # A principal of the database is not a calling service, whatever its scopes.
        (CLIENT_ID, CLIENT_SECRET, "crossmodal:retrieval", 401, "invalid_client"),
        ("gateway", DEVELOPMENT_CLIENT_SECRETS["gateway"], "crossmodal:nothing", 400, "invalid_target"),
        ("gateway", DEVELOPMENT_CLIENT_SECRETS["gateway"], "crossmodal-gateway", 400, "invalid_target"),
        ("reconcile", DEVELOPMENT_CLIENT_SECRETS["reconcile"], "crossmodal:auth", 400, "invalid_target"),
    ],
)  # fmt: skip
def test_refused_grants(
    client: TestClient, caller: str, secret: str, target: str, status: int, code: str
) -> None:
    response = _grant(client, caller, secret, audience=target)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == code
    assert response.headers["cache-control"] == "no-store"


def test_configured_secrets_replace_the_development_ones(make_settings: Any) -> None:
    settings = make_settings(gateway_client_secret="g" * 40)
    with TestClient(create_app(settings)) as client:
        default = _grant(
            client, "gateway", DEVELOPMENT_CLIENT_SECRETS["gateway"], audience="crossmodal:auth"
        )
        assert default.status_code == 401
        assert _grant(client, "gateway", "g" * 40, audience="crossmodal:auth").status_code == 200


def test_the_revocation_feed_takes_a_service_token_only(client: TestClient) -> None:
    assert client.get("/revocations").status_code == 401
    user = client.post(
        "/token", data={"grant_type": "password", "username": "demo", "password": "demo-password"}
    ).json()["access_token"]
    refused = client.get("/revocations", headers={"Authorization": f"Bearer {user}"})
    assert (refused.status_code, refused.json()["code"]) == (401, "invalid_token")
    metadata_token = granted_headers(client, "metadata")
    assert client.get("/revocations", headers=metadata_token).status_code == 401
    feed = client.get("/revocations", headers=granted_headers(client, "auth"))
    assert feed.status_code == 200 and "revocations" in feed.json()
