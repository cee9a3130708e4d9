"""Refresh tokens (rotation, reuse detection, family revocation) and RFC 7009 revocation, in
process against the real app and its SQLite database."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from fastapi.testclient import TestClient

from services.auth.app import create_app
from services.auth.settings import AuthSettings
from tests.service_tokens import granted_headers
from tests.services.auth.conftest import CLIENT_ID, CLIENT_SECRET, READER_PASSWORD


def _login(
    client: TestClient, username: str = "reader", password: str = READER_PASSWORD, **extra: str
) -> dict[str, Any]:
    data = {"grant_type": "password", "username": username, "password": password, **extra}
    response = client.post("/token", data=data)
    assert response.status_code == 200, response.text
    return response.json()


def _refresh(client: TestClient, refresh_token: str, **extra: str) -> httpx.Response:
    return client.post(
        "/token", data={"grant_type": "refresh_token", "refresh_token": refresh_token, **extra}
    )


def _jti(token: str) -> str:
    return jwt.decode(token, options={"verify_signature": False})["jti"]


def _feed(client: TestClient, since: float | None = None) -> list[dict[str, Any]]:
    params = {} if since is None else {"since": since}
    response = client.get("/revocations", params=params, headers=granted_headers(client, "auth"))
    assert response.status_code == 200
    return response.json()["revocations"]


def _revoked_jtis(client: TestClient) -> set[str]:
    return {entry["jti"] for entry in _feed(client) if "jti" in entry}


def test_password_grant_returns_an_opaque_refresh_token(client: TestClient) -> None:
    body = _login(client)
    refresh = body["refresh_token"]
    assert refresh.startswith("cmrt_") and len(refresh) > 40
    assert "." not in refresh  # opaque, not a JWT
    assert body["refresh_token_expires_in"] == 14 * 86400


def test_client_credentials_get_no_refresh_token(client: TestClient) -> None:
    response = client.post(
        "/token",
        data={
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
    )
    assert response.status_code == 200
    assert "refresh_token" not in response.json()


def test_refresh_tokens_are_stored_hashed(client: TestClient, settings: AuthSettings) -> None:
    refresh = _login(client)["refresh_token"]
    db = Path(settings.database_url.removeprefix("sqlite:///"))
    with sqlite3.connect(db) as connection:
        hashes = [row[0] for row in connection.execute("SELECT token_hash FROM refresh_tokens")]
    assert hashlib.sha256(refresh.encode()).hexdigest() in hashes
    assert refresh.encode() not in db.read_bytes()


def test_refresh_rotates_the_token_and_issues_a_new_access_token(client: TestClient) -> None:
    first = _login(client)
    response = _refresh(client, first["refresh_token"])
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    second = response.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert _jti(second["access_token"]) != _jti(first["access_token"])
    assert second["scope"] == "search:text items:read"
    claims = jwt.decode(second["access_token"], options={"verify_signature": False})
    assert claims["sub"] == "reader"
    # The new refresh token works in turn.
    assert _refresh(client, second["refresh_token"]).status_code == 200


def test_reuse_of_a_rotated_refresh_token_revokes_the_whole_family(client: TestClient) -> None:
    first = _login(client)
    second = _refresh(client, first["refresh_token"]).json()
    # The old token again: someone else holds a copy. Refused, and the family dies with it.
    reused = _refresh(client, first["refresh_token"])
    assert reused.status_code == 401
    assert reused.json()["code"] == "invalid_grant"
    assert _refresh(client, second["refresh_token"]).status_code == 401
    # The access tokens the family issued are revoked too.
    assert {_jti(first["access_token"]), _jti(second["access_token"])} <= _revoked_jtis(client)
    # Another login (another family) is not affected.
    other = _login(client)
    assert _refresh(client, other["refresh_token"]).status_code == 200
    assert _jti(other["access_token"]) not in _revoked_jtis(client)


def test_refresh_can_narrow_but_not_widen_the_scope(client: TestClient) -> None:
    refresh = _login(client, scope="search:text")["refresh_token"]
    response = _refresh(client, refresh, scope="items:read")
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_scope"
    # The refused request did not use the token up.
    response = _refresh(client, refresh, scope="search:text")
    assert response.status_code == 200
    assert response.json()["scope"] == "search:text"


def test_refresh_follows_the_principals_current_scopes(client: TestClient) -> None:
    refresh = _login(client)["refresh_token"]
    client.app.state.auth.service.principals.update("reader", scopes=["search:text"])
    response = _refresh(client, refresh)
    assert response.status_code == 200
    assert response.json()["scope"] == "search:text"


def test_disabled_user_cannot_refresh(client: TestClient) -> None:
    refresh = _login(client)["refresh_token"]
    client.app.state.auth.service.principals.set_disabled("reader", True)
    response = _refresh(client, refresh)
    assert response.status_code == 401
    assert response.json()["code"] == "invalid_grant"


@pytest.mark.parametrize("token", ["cmrt_unknown", "not-even-ours"])
def test_unknown_refresh_token_is_invalid_grant(client: TestClient, token: str) -> None:
    response = _refresh(client, token)
    assert response.status_code == 401
    assert response.json()["code"] == "invalid_grant"
    assert response.json()["detail"] == "the refresh token is invalid, expired or revoked"


def test_missing_refresh_token_is_invalid_request(client: TestClient) -> None:
    response = client.post("/token", data={"grant_type": "refresh_token"})
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_request"


def test_expired_refresh_token_is_refused(
    make_settings: Callable[..., AuthSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    with TestClient(create_app(make_settings())) as client:
        refresh = _login(client)["refresh_token"]
        store = client.app.state.auth.service.refresh_tokens
        real_clock = store._clock
        monkeypatch.setattr(store, "_clock", lambda: real_clock() + 15 * 86400)
        response = _refresh(client, refresh)
    assert response.status_code == 401
    assert response.json()["code"] == "invalid_grant"


def test_the_family_has_an_absolute_lifetime(make_settings: Callable[..., AuthSettings]) -> None:
    settings = make_settings(refresh_token_max_lifetime_seconds=120)
    with TestClient(create_app(settings)) as client:
        body = _login(client)
        assert body["refresh_token_expires_in"] <= 120
        rotated = _refresh(client, body["refresh_token"]).json()
        assert rotated["refresh_token_expires_in"] <= 120


def test_revoking_a_refresh_token_revokes_its_family_and_access_tokens(
    client: TestClient,
) -> None:
    first = _login(client)
    second = _refresh(client, first["refresh_token"]).json()
    response = client.post("/revoke", data={"token": second["refresh_token"]})
    assert response.status_code == 200
    assert _refresh(client, second["refresh_token"]).status_code == 401
    assert _jti(second["access_token"]) in _revoked_jtis(client)


def test_revoking_an_access_token_lists_its_jti_until_it_expires(client: TestClient) -> None:
    body = _login(client)
    assert client.post("/revoke", data={"token": body["access_token"]}).status_code == 200
    (entry,) = [e for e in _feed(client) if e.get("jti") == _jti(body["access_token"])]
    exp = jwt.decode(body["access_token"], options={"verify_signature": False})["exp"]
    assert exp <= entry["expires_at"] <= exp + 120


@pytest.mark.parametrize("token", ["garbage", "cmrt_nope", "a.b.c"])
def test_revoking_an_unknown_token_is_not_an_error(client: TestClient, token: str) -> None:
    before = _feed(client)
    assert client.post("/revoke", data={"token": token}).status_code == 200
    assert _feed(client) == before


def test_revoke_needs_a_token_parameter(client: TestClient) -> None:
    response = client.post("/revoke", data={})
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_request"


def test_feed_since_returns_only_newer_entries(client: TestClient) -> None:
    first = _login(client)
    client.post("/revoke", data={"token": first["access_token"]})
    now = client.get("/revocations", headers=granted_headers(client, "auth")).json()["now"]
    second = _login(client)
    client.post("/revoke", data={"token": second["access_token"]})
    newer = {e["jti"] for e in _feed(client, since=now)}
    assert newer == {_jti(second["access_token"])}
    assert {_jti(first["access_token"]), _jti(second["access_token"])} <= _revoked_jtis(client)


def test_families_past_their_lifetime_are_purged(
    client: TestClient, settings: AuthSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    _login(client)
    db = Path(settings.database_url.removeprefix("sqlite:///"))

    def rows() -> int:
        with sqlite3.connect(db) as connection:
            return connection.execute("SELECT count(*) FROM refresh_tokens").fetchone()[0]

    assert rows() == 1
    _feed(client)  # a full feed tidies up; nothing is old enough yet
    assert rows() == 1
    store = client.app.state.auth.service.refresh_tokens
    real_clock = store._clock
    monkeypatch.setattr(store, "_clock", lambda: real_clock() + 31 * 86400)
    _feed(client)
    assert rows() == 0
