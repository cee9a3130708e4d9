"""The admin endpoints (scope admin) and the admin command, in process against the real app."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient

from services.auth import admin as admin_cli
from services.auth.app import create_app
from services.auth.settings import AuthSettings
from tests.service_tokens import granted_headers
from tests.services.auth.conftest import READER_PASSWORD


def _token(client: TestClient, username: str, password: str, scope: str | None = None) -> str:
    data = {"grant_type": "password", "username": username, "password": password}
    if scope:
        data["scope"] = scope
    response = client.post("/token", data=data)
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


@pytest.fixture
def admin(client: TestClient) -> dict[str, str]:
    return {"Authorization": f"Bearer {_token(client, 'demo', 'demo-password')}"}


def _problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == code
    return response.json()


def test_admin_endpoints_need_an_admin_token(client: TestClient) -> None:
    _problem(client.get("/admin/principals"), 401, "missing_token")
    bad = {"Authorization": "Bearer not-a-token"}
    _problem(client.get("/admin/principals", headers=bad), 401, "invalid_token")
    reader = {"Authorization": f"Bearer {_token(client, 'reader', READER_PASSWORD)}"}
    body = _problem(client.get("/admin/principals", headers=reader), 403, "insufficient_scope")
    assert body["required_scopes"] == ["admin"]
    # demo holds admin, but a token narrowed to other scopes is no admin token.
    narrowed = {"Authorization": f"Bearer {_token(client, 'demo', 'demo-password', 'items:read')}"}
    _problem(client.post("/admin/keys/rotate", headers=narrowed), 403, "insufficient_scope")


def test_forged_admin_token_is_refused(client: TestClient, admin: dict[str, str]) -> None:
    token = admin["Authorization"].split()[1]
    claims = jwt.decode(token, options={"verify_signature": False})
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = jwt.get_unverified_header(token)["kid"]
    forged = jwt.encode(claims, other, algorithm="RS256", headers={"kid": kid})
    _problem(
        client.get("/admin/principals", headers={"Authorization": f"Bearer {forged}"}),
        401,
        "invalid_token",
    )


def test_create_list_get_and_use_a_principal(client: TestClient, admin: dict[str, str]) -> None:
    response = client.post(
        "/admin/principals",
        headers=admin,
        json={
            "name": "alice",
            "secret": "alice-password-1",
            "scopes": ["items:read", "search:text"],
        },
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert "secret" not in body  # a given secret is never echoed
    assert body["principal"] == {
        **body["principal"],
        "name": "alice",
        "kind": "user",
        "scopes": ["search:text", "items:read"],
        "disabled": False,
    }
    names = [p["name"] for p in client.get("/admin/principals", headers=admin).json()["principals"]]
    assert names == sorted(names) and {"alice", "demo", "reader", "indexer"} <= set(names)
    assert client.get("/admin/principals/alice", headers=admin).json()["name"] == "alice"
    _token(client, "alice", "alice-password-1")


def test_a_client_without_a_secret_gets_a_generated_one_once(
    client: TestClient, admin: dict[str, str]
) -> None:
    response = client.post(
        "/admin/principals",
        headers=admin,
        json={"name": "bot", "kind": "client", "scopes": ["items:write"]},
    )
    assert response.status_code == 201
    secret = response.json()["secret"]
    assert len(secret) >= 24
    token = client.post(
        "/token",
        data={"grant_type": "client_credentials", "client_id": "bot", "client_secret": secret},
    )
    assert token.status_code == 200
    assert secret not in client.get("/admin/principals/bot", headers=admin).text


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"name": "demo", "secret": "another-password"}, 409, "principal_exists"),
        ({"name": "x", "secret": "short"}, 422, "weak_secret"),
        ({"name": "x", "secret": "long-enough-secret", "scopes": ["root"]}, 422, "unknown_scope"),
        ({"name": "bad name", "secret": "long-enough-secret"}, 422, "validation_error"),
        ({"name": "x", "kind": "robot"}, 422, "validation_error"),
    ],
)
def test_bad_principal_requests_are_refused(
    client: TestClient, admin: dict[str, str], body: dict[str, Any], status: int, code: str
) -> None:
    response = client.post("/admin/principals", headers=admin, json=body)
    _problem(response, status, code)
    assert "another-password" not in response.text and "short" not in response.text.replace(
        "shorter", ""
    )


def test_principal_times_carry_their_time_zone(client: TestClient, admin: dict[str, str]) -> None:
    # SQLite hands naive datetimes back; every stored one is UTC, and the answer says so.
    created_at = client.get("/admin/principals/demo", headers=admin).json()["created_at"]
    assert datetime.fromisoformat(created_at).utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/admin/revocations", {"jti": "abc", "expires_at": False}),
        ("POST", "/admin/revocations", {"jti": "abc", "expires_at": "2000000000"}),
        ("PATCH", "/admin/principals/reader", {"disabled": 0}),
        ("PATCH", "/admin/principals/reader", {"disabled": "true"}),
    ],
)
def test_admin_bodies_take_json_types_as_they_are(
    client: TestClient, admin: dict[str, str], method: str, path: str, body: dict[str, Any]
) -> None:
    # false is not a time nor 0 a boolean: what the document says is what is accepted.
    _problem(client.request(method, path, headers=admin, json=body), 422, "validation_error")
    assert client.get("/admin/principals/reader", headers=admin).json()["disabled"] is False


def test_unknown_principal_is_404(client: TestClient, admin: dict[str, str]) -> None:
    for response in (
        client.get("/admin/principals/nobody", headers=admin),
        client.patch("/admin/principals/nobody", headers=admin, json={"disabled": True}),
        client.post("/admin/principals/nobody/revoke-tokens", headers=admin),
    ):
        _problem(response, 404, "principal_not_found")


def _subject_entries(client: TestClient, name: str) -> list[dict[str, Any]]:
    return [
        e
        for e in client.get("/revocations", headers=granted_headers(client, "auth")).json()[
            "revocations"
        ]
        if e.get("sub") == name
    ]


def test_disabling_revokes_every_token_and_refresh_token(
    client: TestClient, admin: dict[str, str]
) -> None:
    login = client.post(
        "/token", data={"grant_type": "password", "username": "reader", "password": READER_PASSWORD}
    ).json()
    iat = jwt.decode(login["access_token"], options={"verify_signature": False})["iat"]
    response = client.patch("/admin/principals/reader", headers=admin, json={"disabled": True})
    assert response.status_code == 200 and response.json()["disabled"] is True
    (entry,) = _subject_entries(client, "reader")
    assert entry["not_before"] > iat  # every token issued so far is covered
    refresh = client.post(
        "/token", data={"grant_type": "refresh_token", "refresh_token": login["refresh_token"]}
    )
    assert refresh.status_code == 401
    login_again = client.post(
        "/token", data={"grant_type": "password", "username": "reader", "password": READER_PASSWORD}
    )
    assert login_again.status_code == 401


def test_removing_scopes_revokes_access_tokens_adding_does_not(
    client: TestClient, admin: dict[str, str]
) -> None:
    response = client.patch(
        "/admin/principals/reader",
        headers=admin,
        json={"scopes": ["search:text", "items:read", "search:image"]},
    )
    assert response.json()["scopes"] == ["search:text", "search:image", "items:read"]
    assert _subject_entries(client, "reader") == []
    client.patch("/admin/principals/reader", headers=admin, json={"scopes": ["search:text"]})
    assert len(_subject_entries(client, "reader")) == 1


def test_new_secret_replaces_the_old_and_revokes_tokens(
    client: TestClient, admin: dict[str, str]
) -> None:
    response = client.patch(
        "/admin/principals/reader", headers=admin, json={"secret": "a-brand-new-secret"}
    )
    assert response.status_code == 200
    assert "a-brand-new-secret" not in response.text
    assert len(_subject_entries(client, "reader")) == 1
    old = client.post(
        "/token", data={"grant_type": "password", "username": "reader", "password": READER_PASSWORD}
    )
    assert old.status_code == 401
    _token(client, "reader", "a-brand-new-secret")


def test_revoke_tokens_and_revoke_jti(client: TestClient, admin: dict[str, str]) -> None:
    before = time.time()
    response = client.post("/admin/principals/reader/revoke-tokens", headers=admin)
    after = time.time()
    assert response.status_code == 200
    body = response.json()
    assert body["kind"] == "subject" and body["sub"] == "reader"
    # The next whole second after the revocation, however long the request took.
    assert int(before) + 1 <= body["not_before"] <= int(after) + 1
    response = client.post(
        "/admin/revocations",
        headers=admin,
        json={"jti": "some-jti", "expires_at": time.time() + 60},
    )
    assert response.status_code == 201
    assert response.json()["jti"] == "some-jti"
    assert "some-jti" in {
        e.get("jti")
        for e in client.get("/revocations", headers=granted_headers(client, "auth")).json()[
            "revocations"
        ]
    }


def test_a_revoked_admin_token_is_refused_by_the_auth_service_itself(
    client: TestClient, admin: dict[str, str]
) -> None:
    jti = jwt.decode(admin["Authorization"].split()[1], options={"verify_signature": False})["jti"]
    assert client.post("/admin/revocations", headers=admin, json={"jti": jti}).status_code == 201
    _problem(client.get("/admin/principals", headers=admin), 401, "token_revoked")


def test_keys_and_rotation(client: TestClient, admin: dict[str, str]) -> None:
    old_token = admin["Authorization"].split()[1]
    old_kid = jwt.get_unverified_header(old_token)["kid"]
    (key,) = client.get("/admin/keys", headers=admin).json()["keys"]
    assert key["kid"] == old_kid and key["signing"] and key["published"]
    rotated_at = time.time()
    response = client.post("/admin/keys/rotate", headers=admin)
    assert response.status_code == 200
    rotation = response.json()
    assert rotation["previous_kid"] == old_kid and rotation["kid"] != old_kid
    assert rotation["previous_published_until"] >= rotated_at + 600  # >= the access TTL
    keys = {k["kid"]: k for k in client.get("/admin/keys", headers=admin).json()["keys"]}
    assert keys[rotation["kid"]]["signing"]
    assert not keys[old_kid]["signing"] and keys[old_kid]["published"]
    assert keys[old_kid]["retired_at"] is not None
    # The old admin token still works (its key is still published); new ones use the new key.
    new_token = _token(client, "demo", "demo-password")
    assert jwt.get_unverified_header(new_token)["kid"] == rotation["kid"]
    assert [k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]] == [
        rotation["kid"],
        old_kid,
    ]


@pytest.fixture
def cli_env(settings: AuthSettings, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AUTH_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("AUTH_PRIVATE_KEY_PATH", str(settings.private_key_path))
    monkeypatch.setenv("AUTH_ARGON2_TIME_COST", "1")
    monkeypatch.setenv("AUTH_ARGON2_MEMORY_KIB", "64")
    yield


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = admin_cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_admin_command_manages_principals_seen_by_the_running_service(
    client: TestClient,
    cli_env: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("carol-password-1\n"))
    code, out, _ = _cli(capsys, "create-user", "carol", "--scope", "search:text", "--stdin")
    assert code == 0 and "carol" in out
    assert "carol-password-1" not in out
    _token(client, "carol", "carol-password-1")  # the running service sees her at once

    code, out, _ = _cli(capsys, "--json", "create-client", "robot", "--scope", "items:write")
    created = json.loads(out)
    assert created["principal"]["kind"] == "client" and len(created["secret"]) >= 24

    code, out, _ = _cli(capsys, "--json", "list")
    assert {p["name"] for p in json.loads(out)} >= {"carol", "robot", "demo"}

    assert _cli(capsys, "set-scopes", "carol", "search:text", "search:image")[0] == 0
    code, out, _ = _cli(capsys, "--json", "list")
    (carol,) = [p for p in json.loads(out) if p["name"] == "carol"]
    assert carol["scopes"] == ["search:text", "search:image"]

    assert _cli(capsys, "disable", "carol")[0] == 0
    response = client.post(
        "/token",
        data={"grant_type": "password", "username": "carol", "password": "carol-password-1"},
    )
    assert response.status_code == 401
    assert _subject_entries(client, "carol")

    code, _, err = _cli(capsys, "set-scopes", "carol", "root")
    assert code == 1 and "unknown_scope" in err
    code, _, err = _cli(capsys, "disable", "nobody")
    assert code == 1 and "principal_not_found" in err


def test_admin_command_revokes_a_jti(
    client: TestClient, cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    token = _token(client, "reader", READER_PASSWORD)
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    assert _cli(capsys, "revoke-jti", jti)[0] == 0
    assert jti in {
        e.get("jti")
        for e in client.get("/revocations", headers=granted_headers(client, "auth")).json()[
            "revocations"
        ]
    }


def test_admin_command_rotation_is_picked_up_by_the_running_service(
    make_settings: Callable[..., AuthSettings],
    cli_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = make_settings(key_check_interval_seconds=0.05)
    with TestClient(create_app(settings)) as client:
        old_kid = client.get("/.well-known/jwks.json").json()["keys"][0]["kid"]
        code, out, _ = _cli(capsys, "--json", "rotate-key")
        assert code == 0
        rotation = json.loads(out)
        assert rotation["previous_kid"] == old_kid
        time.sleep(0.1)
        kids = [k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]]
        assert kids == [rotation["kid"], old_kid]
        token = _token(client, "demo", "demo-password")
        assert jwt.get_unverified_header(token)["kid"] == rotation["kid"]
        code, out, _ = _cli(capsys, "keys")
        assert rotation["kid"] in out and "signing" in out


def test_admin_command_refuses_a_production_start_without_a_key(
    make_settings: Callable[..., AuthSettings],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
) -> None:
    monkeypatch.setenv("AUTH_ENVIRONMENT", "production")
    monkeypatch.setenv("AUTH_DATABASE_URL", f"sqlite:///{tmp_path / 'p.db'}")
    monkeypatch.setenv("AUTH_PRIVATE_KEY_PATH", str(tmp_path / "missing.pem"))
    monkeypatch.setenv("AUTH_BOOTSTRAP_USERS", "[]")
    monkeypatch.setenv("AUTH_GATEWAY_CLIENT_SECRET", "g" * 32)
    monkeypatch.setenv("AUTH_RECONCILE_CLIENT_SECRET", "r" * 32)
    code, _, err = _cli(capsys, "list")
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "missing.pem").exists()
