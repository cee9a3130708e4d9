"""Service tokens for the tests of an internal service run in-process: a signing key made the
way the auth service makes its own, the auth service's token issuer, and the key source an app
under test verifies its callers with (``create_app(..., token_keys=KEYS)``).

``auth_settings`` configures a real auth service that signs with the same key, for a test whose
callers fetch their tokens (``shared.service_tokens``). The end-to-end tests get theirs from the
auth service of their stack (``LocalStack``)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient

from services.auth.issuer import TokenIssuer
from services.auth.keys import KeyRing, SigningKey
from services.auth.settings import AuthSettings
from shared.service_auth import DEVELOPMENT_CLIENT_SECRETS, SERVICE_SCOPES, audience
from shared.tokens import parse_jwks

ISSUER_NAME = "crossmodal-auth"


def new_ring() -> KeyRing:
    return KeyRing([SigningKey.from_private_key(rsa.generate_private_key(65537, 2048))])


class RingKeys:
    """A key ring as a ``shared.tokens.KeySource`` (parsed once: the verifier's memo trusts a
    remembered token only while its key is the very object it was verified with)."""

    def __init__(self, ring: KeyRing) -> None:
        self.ring = ring
        self._keys = parse_jwks(ring.jwks())

    async def key(self, kid: str) -> jwt.PyJWK | None:
        return self._keys.get(kid)


RING = new_ring()
KEYS = RingKeys(RING)
ISSUER = TokenIssuer(RING, issuer=ISSUER_NAME, audience="crossmodal-gateway", ttl_seconds=3600)


def service_token(service: str, scopes: Iterable[str] | None = None) -> str:
    """A token for ``service`` with ``scopes`` (default: every scope of that service)."""
    granted = SERVICE_SCOPES[service] if scopes is None else scopes
    return ISSUER.issue("tests", granted, audience=audience(service)).access_token


def service_headers(service: str, scopes: Iterable[str] | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {service_token(service, scopes)}"}


def auth_environment(directory: Path) -> dict[str, str]:
    """The ``AUTH_*`` variables of an auth service under ``directory`` that signs with
    ``RING``'s key (cheap argon2, no bootstrap users, the development client secrets)."""
    key_path = directory / "signing-key.pem"
    private_key = RING.signing_key.private_key
    assert private_key is not None
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return {
        "AUTH_DATABASE_URL": f"sqlite:///{directory / 'auth.db'}",
        "AUTH_PRIVATE_KEY_PATH": str(key_path),
        "AUTH_ISSUER": ISSUER_NAME,
        "AUTH_ARGON2_TIME_COST": "1",
        "AUTH_ARGON2_MEMORY_KIB": "64",
        "AUTH_BOOTSTRAP_USERS": "[]",
    }


def auth_settings(directory: Path, **overrides: Any) -> AuthSettings:
    """The settings of ``auth_environment``, for an auth app in-process."""
    values: dict[str, Any] = {
        name.removeprefix("AUTH_").lower(): value
        for name, value in auth_environment(directory).items()
    }
    values["bootstrap_users"] = []
    return AuthSettings(**{**values, **overrides})


def granted_headers(
    auth: TestClient, service: str, caller: str = "gateway", secret: str | None = None
) -> dict[str, str]:
    """Authorization headers with a token for ``service`` that the auth app ``auth`` grants
    ``caller`` (the client-credentials grant, its development secret by default)."""
    response = auth.post(
        "/token",
        data={"grant_type": "client_credentials", "audience": audience(service)},
        auth=(caller, DEVELOPMENT_CLIENT_SECRETS[caller] if secret is None else secret),
    )
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}
