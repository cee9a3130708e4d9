"""AuthSettings: defaults, the environment, and the production guards."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from services.auth.scopes import KNOWN_SCOPES
from services.auth.settings import AuthSettings
from shared.service_auth import DEVELOPMENT_CLIENT_SECRETS, MIN_PRODUCTION_CLIENT_SECRET_LENGTH

STRONG = "correct-horse-battery"
SERVICE_SECRETS = {
    "gateway_client_secret": "g" * MIN_PRODUCTION_CLIENT_SECRET_LENGTH,
    "reconcile_client_secret": "r" * MIN_PRODUCTION_CLIENT_SECRET_LENGTH,
}
PRODUCTION: dict[str, Any] = {
    "environment": "production",
    "argon2_time_cost": 2,
    "argon2_memory_kib": 19 * 1024,
    **SERVICE_SECRETS,
}


def test_development_defaults() -> None:
    settings = AuthSettings()
    assert settings.port == 8001
    assert settings.database_url == "sqlite:///var/auth/auth.db"
    assert str(settings.private_key_path) == "var/auth/signing-key.pem"
    assert (settings.issuer, settings.audience) == ("crossmodal-auth", "crossmodal-gateway")
    assert settings.access_token_ttl_seconds == 900
    (demo,) = settings.bootstrap_users
    assert demo.username == "demo"
    assert demo.password.get_secret_value() == "demo-password"
    assert demo.scopes == KNOWN_SCOPES
    assert "demo-password" not in repr(settings)


def test_environment_variables_use_the_auth_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    users = [{"username": "alice", "password": STRONG, "scopes": ["search:text"]}]
    monkeypatch.setenv("AUTH_BOOTSTRAP_USERS", json.dumps(users))
    monkeypatch.setenv("AUTH_ACCESS_TOKEN_TTL_SECONDS", "120")
    monkeypatch.setenv("AUTH_PORT", "9001")
    settings = AuthSettings()
    assert [u.username for u in settings.bootstrap_users] == ["alice"]
    assert settings.bootstrap_users[0].scopes == ("search:text",)
    assert (settings.access_token_ttl_seconds, settings.port) == (120, 9001)


@pytest.mark.parametrize("ttl", [4, 86401])
def test_ttl_bounds(ttl: int) -> None:
    with pytest.raises(ValidationError):
        AuthSettings(access_token_ttl_seconds=ttl)


def test_production_refuses_the_default_password() -> None:
    with pytest.raises(ValidationError, match="default development password"):
        AuthSettings(**PRODUCTION)


@pytest.mark.parametrize("password", ["short-pw", "elevenchars"])
def test_production_refuses_short_passwords(password: str) -> None:
    users = [{"username": "alice", "password": password, "scopes": []}]
    with pytest.raises(ValidationError, match="shorter than 12") as caught:
        AuthSettings(**PRODUCTION, bootstrap_users=users)
    # The refused configuration (secrets included) is never echoed into the startup logs.
    assert password not in str(caught.value)
    assert "input_value" not in str(caught.value)


def test_empty_password_is_refused_everywhere() -> None:
    users = [{"username": "alice", "password": "", "scopes": []}]
    with pytest.raises(ValidationError, match="must not be empty"):
        AuthSettings(bootstrap_users=users)


def test_an_invalid_bootstrap_user_is_not_echoed() -> None:
    users = [{"username": "alice", "password": "s3cret-in-a-bad-entry", "scopes": ["nope"]}]
    with pytest.raises(ValidationError, match="unknown scope") as caught:
        AuthSettings(bootstrap_users=users)
    assert "s3cret-in-a-bad-entry" not in str(caught.value)
    assert "input_value" not in str(caught.value)


def test_production_refuses_short_client_secrets() -> None:
    clients = [{"client_id": "svc", "client_secret": "tiny", "scopes": []}]
    with pytest.raises(ValidationError, match="client 'svc'"):
        AuthSettings(**PRODUCTION, bootstrap_users=[], bootstrap_clients=clients)


@pytest.mark.parametrize("caller", ["gateway", "reconcile"])
def test_production_refuses_the_default_or_a_short_service_client_secret(caller: str) -> None:
    field = f"{caller}_client_secret"
    with pytest.raises(ValidationError, match=f"the {caller} client secret is the development"):
        AuthSettings(**{**PRODUCTION, field: DEVELOPMENT_CLIENT_SECRETS[caller]})
    short = "s" * (MIN_PRODUCTION_CLIENT_SECRET_LENGTH - 1)
    with pytest.raises(ValidationError, match=f"the {caller} client secret is shorter") as caught:
        AuthSettings(**{**PRODUCTION, field: short})
    assert short not in str(caught.value)
    # Development takes the defaults, so a local stack needs no configuration.
    assert (
        AuthSettings().client_secrets()[caller].get_secret_value()
        == (DEVELOPMENT_CLIENT_SECRETS[caller])
    )


def test_production_refuses_a_weak_argon2_cost() -> None:
    with pytest.raises(ValidationError, match="ARGON2_MEMORY_KIB"):
        AuthSettings(**{**PRODUCTION, "argon2_memory_kib": 64}, bootstrap_users=[])


def test_production_accepts_strong_passwords_and_no_users() -> None:
    users = [{"username": "alice", "password": STRONG, "scopes": ["admin"]}]
    assert AuthSettings(**PRODUCTION, bootstrap_users=users).is_production
    assert AuthSettings(**PRODUCTION, bootstrap_users=[]).bootstrap_users == ()


def test_unknown_scopes_and_duplicate_names_are_refused() -> None:
    with pytest.raises(ValidationError, match="unknown scope"):
        AuthSettings(bootstrap_users=[{"username": "a", "password": STRONG, "scopes": ["admn"]}])
    with pytest.raises(ValidationError, match="unique"):
        AuthSettings(
            bootstrap_users=[{"username": "twin", "password": STRONG}],
            bootstrap_clients=[{"client_id": "twin", "client_secret": STRONG}],
        )
