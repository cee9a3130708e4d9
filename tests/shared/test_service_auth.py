"""Service-to-service authentication on the callee's side: every route of every internal
service, as its OpenAPI document lists them (so a new route cannot be left out), refuses a
missing, forged, expired or wrong-audience service token and one without the route's scope,
with a problem body, and takes the right one; only the probes and the scrape need none."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient

import shared.tokens
from services.auth.app import create_app as auth_app
from services.auth.issuer import TokenIssuer
from services.feature.app import create_app as feature_app
from services.feature.settings import FeatureSettings
from services.metadata.app import create_app as metadata_app
from services.metadata.settings import MetadataSettings
from services.retrieval.app import create_app as retrieval_app
from services.retrieval.settings import RetrievalSettings
from shared.problems import Unauthorized
from shared.service_auth import CALLERS, SERVICE_SCOPES, audience
from shared.tokens import TokenVerifier
from tests.service_tokens import ISSUER, ISSUER_NAME, KEYS, RING, auth_settings, service_token

# The auth service's routes that take no service token, and why.
AUTH_OPEN = {
    ("post", "/token"): "the credentials exchange itself",
    ("post", "/revoke"): "RFC 7009, for token holders",
    ("get", "/.well-known/jwks.json"): "public keys",
}
AUTH_ADMIN_PREFIX = "/admin/"  # an admin user's own token (services/auth/admin_api.py)
SAMPLE_PARAMETERS = {"collection": "c", "item_id": "1", "name": "someone", "deletion_id": "1"}


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory, random_model_dir: Path) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("internal")
    clients = {
        "retrieval": TestClient(
            retrieval_app(RetrievalSettings(data_dir=root / "vectors"), token_keys=KEYS)
        ),
        "metadata": TestClient(
            metadata_app(
                MetadataSettings(
                    database_url=f"sqlite:///{root / 'metadata.db'}", image_dir=root / "images"
                ),
                token_keys=KEYS,
            )
        ),
        "feature": TestClient(
            feature_app(
                FeatureSettings(
                    model=str(random_model_dir), device="cpu", runtime="torch", torch_threads=1
                ),
                token_keys=KEYS,
            )
        ),
        # The auth service checks service tokens against its own keys: RING's here.
        "auth": TestClient(auth_app(auth_settings(root / "auth"))),
    }
    with contextlib.ExitStack() as stack:
        for client in clients.values():
            stack.enter_context(client)
        yield clients


def _operations() -> list[tuple[str, str, str]]:
    """(service, method, path) of every documented operation of every internal service."""
    found = []
    documents = {
        "retrieval": retrieval_app(RetrievalSettings()).openapi(),
        "metadata": metadata_app(MetadataSettings()).openapi(),
        "feature": feature_app(FeatureSettings(model="unused")).openapi(),
        "auth": auth_app().openapi(),
    }
    for service, document in documents.items():
        for path, item in document["paths"].items():
            found.extend((service, method, path) for method in item)
    return found


OPERATIONS = _operations()
GUARDED = [
    op
    for op in OPERATIONS
    if not (
        op[0] == "auth" and ((op[1], op[2]) in AUTH_OPEN or op[2].startswith(AUTH_ADMIN_PREFIX))
    )
]


def _document(service: str) -> dict[str, Any]:
    make = {
        "retrieval": lambda: retrieval_app(RetrievalSettings()),
        "metadata": lambda: metadata_app(MetadataSettings()),
        "feature": lambda: feature_app(FeatureSettings(model="unused")),
        "auth": auth_app,
    }[service]
    return make().openapi()  # type: ignore[no-any-return]


def _scope_of(service: str, method: str, path: str) -> str:
    (requirement,) = _document(service)["paths"][path][method]["security"]
    (scope,) = requirement["ServiceToken"]
    return scope  # type: ignore[no-any-return]


def _url(path: str) -> str:
    return re.sub(r"{(\w+)}", lambda m: SAMPLE_PARAMETERS[m.group(1)], path)


def _call(client: TestClient, method: str, path: str, token: str | None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    body = {"json": {}} if method in ("post", "put", "patch") else {}
    return client.request(method.upper(), _url(path), headers=headers, **body)


def _assert_refused(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert (body["status"], body["code"]) == (status, code), body
    assert body["detail"]


def _forged(service: str, scopes: list[str]) -> str:
    # The claims of a good token and the key id of auth's key, signed by another key.
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    claims = {
        "iss": ISSUER_NAME,
        "aud": audience(service),
        "sub": "gateway",
        "scope": " ".join(scopes),
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": "forged",
    }
    return jwt.encode(claims, other, algorithm="RS256", headers={"kid": RING.signing_key.kid})


def _expired(service: str, scopes: list[str]) -> str:
    past = TokenIssuer(
        RING,
        issuer=ISSUER_NAME,
        audience="crossmodal-gateway",
        ttl_seconds=60,
        clock=lambda: time.time() - 3600,
    )
    return past.issue("gateway", scopes, audience=audience(service)).access_token


def test_every_guarded_operation_names_its_service_scope() -> None:
    assert {service for service, _, _ in GUARDED} == set(SERVICE_SCOPES)
    for service, method, path in GUARDED:
        scope = _scope_of(service, method, path)
        assert scope in SERVICE_SCOPES[service], (service, method, path)
    # The auth service's open routes are only those named above.
    auth_routes = {(m, p) for s, m, p in OPERATIONS if s == "auth"}
    assert set(AUTH_OPEN) <= auth_routes
    assert ("get", "/revocations") in {(m, p) for s, m, p in GUARDED if s == "auth"}


def test_every_scope_is_used_and_every_caller_scope_exists() -> None:
    used = {(s, _scope_of(s, m, p)) for s, m, p in GUARDED}
    assert used == {(s, scope) for s, scopes in SERVICE_SCOPES.items() for scope in scopes}
    for caller, services in CALLERS.items():
        for service, scopes in services.items():
            assert scopes <= set(SERVICE_SCOPES[service]), (caller, service)


@pytest.mark.parametrize(("service", "method", "path"), GUARDED, ids=lambda v: str(v))
def test_each_internal_route_takes_only_a_valid_service_token_with_its_scope(
    apps: dict[str, TestClient], service: str, method: str, path: str
) -> None:
    client = apps[service]
    scope = _scope_of(service, method, path)
    _assert_refused(_call(client, method, path, None), 401, "missing_token")
    _assert_refused(_call(client, method, path, _forged(service, [scope])), 401, "invalid_token")
    _assert_refused(_call(client, method, path, _expired(service, [scope])), 401, "token_expired")
    other = next(s for s in SERVICE_SCOPES if s != service)
    wrong_audience = ISSUER.issue("gateway", [scope], audience=audience(other)).access_token
    _assert_refused(_call(client, method, path, wrong_audience), 401, "invalid_token")
    # A user's token (the gateway's audience) never opens an internal service.
    user = ISSUER.issue("demo", ["search:text", "items:read", "admin"]).access_token
    _assert_refused(_call(client, method, path, user), 401, "invalid_token")
    others = [s for s in SERVICE_SCOPES[service] if s != scope]
    if others:
        _assert_refused(
            _call(client, method, path, service_token(service, others)), 403, "insufficient_scope"
        )
    accepted = _call(client, method, path, service_token(service, [scope]))
    assert accepted.status_code not in (401, 403), accepted.text


@pytest.mark.parametrize("service", sorted(SERVICE_SCOPES))
def test_only_probes_and_the_scrape_are_open(apps: dict[str, TestClient], service: str) -> None:
    client = apps[service]
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path).status_code == 200, path
    # The document, the docs page and an unknown path are internal too.
    for path in ("/openapi.json", "/docs", "/no-such-route"):
        _assert_refused(client.get(path), 401, "missing_token")


def test_a_token_is_verified_once_and_remembered(
    apps: dict[str, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[str] = []
    decode = shared.tokens.jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        decoded.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(shared.tokens.jwt, "decode", counting)
    token = service_token("retrieval", ["retrieval:read"])
    for _ in range(5):
        assert _call(apps["retrieval"], "get", "/collections", token).status_code == 200
    assert decoded == [token]


@pytest.mark.anyio
async def test_a_service_token_never_opens_the_gateway() -> None:
    # The gateway's verifier: the users' audience only.
    gateway = TokenVerifier(KEYS, issuer=ISSUER_NAME, audience="crossmodal-gateway")
    assert (await gateway.verify(ISSUER.issue("demo", ["admin"]).access_token)).subject == "demo"
    for service in SERVICE_SCOPES:
        with pytest.raises(Unauthorized) as refused:
            await gateway.verify(service_token(service))
        assert refused.value.code == "invalid_token"
