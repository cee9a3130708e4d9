"""The auth service on PostgreSQL (a schema of this module's own, dropped at the end): principals,
refresh-token rotation and reuse detection, revocations and key rotation all work there too.
PostgreSQL being unreachable is a failure, not a skip. AUTH_TEST_POSTGRES_URL points elsewhere."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import jwt
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from services.auth.app import create_app
from services.auth.settings import AuthSettings
from tests.service_tokens import granted_headers
from tests.services.auth.conftest import READER_PASSWORD

POSTGRES_URL = os.environ.get(
    "AUTH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    schema = f"auth_test_{uuid.uuid4().hex[:12]}"
    base = make_url(POSTGRES_URL).update_query_dict({"connect_timeout": "5"})
    admin = create_engine(base, poolclass=NullPool)
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = base.update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()


@pytest.fixture
def pg_client(
    make_settings: Callable[..., AuthSettings], postgres_url: str
) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(database_url=postgres_url))) as client:
        yield client


def test_the_whole_token_lifecycle_on_postgresql(pg_client: TestClient) -> None:
    client = pg_client
    login = client.post(
        "/token",
        data={"grant_type": "password", "username": "reader", "password": READER_PASSWORD},
    ).json()
    rotated = client.post(
        "/token", data={"grant_type": "refresh_token", "refresh_token": login["refresh_token"]}
    )
    assert rotated.status_code == 200, rotated.text
    reused = client.post(
        "/token", data={"grant_type": "refresh_token", "refresh_token": login["refresh_token"]}
    )
    assert reused.status_code == 401
    revoked = {
        e.get("jti")
        for e in client.get("/revocations", headers=granted_headers(client, "auth")).json()[
            "revocations"
        ]
    }
    assert (
        jwt.decode(rotated.json()["access_token"], options={"verify_signature": False})["jti"]
        in revoked
    )

    admin_token = client.post(
        "/token",
        data={"grant_type": "password", "username": "demo", "password": "demo-password"},
    ).json()["access_token"]
    admin = {"Authorization": f"Bearer {admin_token}"}
    created = client.post(
        "/admin/principals",
        headers=admin,
        json={"name": "pg-user", "secret": "pg-user-password", "scopes": ["items:read"]},
    )
    assert created.status_code == 201, created.text
    again = client.post(
        "/admin/principals", headers=admin, json={"name": "pg-user", "secret": "x" * 12}
    )
    assert again.status_code == 409
    assert client.post("/admin/principals/pg-user/revoke-tokens", headers=admin).status_code == 200
    rotation = client.post("/admin/keys/rotate", headers=admin).json()
    kids = [k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]]
    assert kids[:2] == [rotation["kid"], rotation["previous_kid"]]
    # The admin token signed by the retired key still works.
    assert client.get("/admin/keys", headers=admin).status_code == 200
