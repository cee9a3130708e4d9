"""Fixtures for the auth service tests: settings in a tmp dir, one RSA key per session (key
generation is slow on a shared machine), and a cheap argon2 cost."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient

from services.auth.app import create_app
from services.auth.scopes import KNOWN_SCOPES
from services.auth.settings import AuthSettings

CLIENT_ID = "indexer"
CLIENT_SECRET = "indexer-secret-0123456789"
READER_PASSWORD = "reader-password-123"


@pytest.fixture(autouse=True)
def _no_auth_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The developer's AUTH_* variables must not leak into the tests.
    for name in list(os.environ):
        if name.upper().startswith("AUTH_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def rsa_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture
def make_settings(tmp_path: Path, rsa_pem: bytes) -> Callable[..., AuthSettings]:
    """AuthSettings under tmp_path. ``write_key=False`` leaves the key file absent."""

    def factory(*, write_key: bool = True, **overrides: Any) -> AuthSettings:
        key_path = tmp_path / "keys" / "signing-key.pem"
        if write_key and not key_path.exists():
            key_path.parent.mkdir(parents=True, exist_ok=True)
            key_path.write_bytes(rsa_pem)
            key_path.chmod(0o600)
        values: dict[str, Any] = {
            "database_url": f"sqlite:///{tmp_path / 'db' / 'auth.db'}",
            "private_key_path": key_path,
            "access_token_ttl_seconds": 600,
            "argon2_time_cost": 1,
            "argon2_memory_kib": 64,
            "bootstrap_users": [
                {"username": "demo", "password": "demo-password", "scopes": list(KNOWN_SCOPES)},
                {
                    "username": "reader",
                    "password": READER_PASSWORD,
                    "scopes": ["search:text", "items:read"],
                },
            ],
            "bootstrap_clients": [
                {
                    "client_id": CLIENT_ID,
                    "client_secret": CLIENT_SECRET,
                    "scopes": ["items:read", "items:write"],
                }
            ],
        }
        values.update(overrides)
        return AuthSettings(**values)

    return factory


@pytest.fixture
def settings(make_settings: Callable[..., AuthSettings]) -> AuthSettings:
    return make_settings()


@pytest.fixture
def client(settings: AuthSettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client
