"""The gateway's Redis client: the password comes from GATEWAY_REDIS_PASSWORD (a Kubernetes
Secret), not from the URL, and never shows in the settings."""

from __future__ import annotations

import pytest

from services.gateway.redis_guard import make_redis_client
from services.gateway.settings import GatewaySettings

PASSWORD = "a-password-from-the-crossmodal-redis-secret"


def _password(url: str, password: str | None) -> str | None:
    client = make_redis_client(url, 0.5, password)
    return client.connection_pool.connection_kwargs.get("password")


def test_the_password_setting_reaches_the_client_and_stays_hidden(monkeypatch) -> None:
    monkeypatch.setenv("GATEWAY_REDIS_PASSWORD", PASSWORD)
    settings = GatewaySettings()
    assert settings.redis_password is not None
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings.model_dump())
    assert _password(settings.redis_url, settings.redis_password.get_secret_value()) == PASSWORD


def test_no_password_by_default(monkeypatch) -> None:
    monkeypatch.delenv("GATEWAY_REDIS_PASSWORD", raising=False)
    assert GatewaySettings().redis_password is None
    assert _password("redis://127.0.0.1:6379/0", None) is None


@pytest.mark.parametrize("setting", [None, PASSWORD])
def test_a_password_in_the_url_wins(setting: str | None) -> None:
    assert _password("redis://:from-the-url@127.0.0.1:6379/0", setting) == "from-the-url"
