"""The auth service's own per-account limit of password logins (``services.auth.lockout``):
exponential back-off after the free failures, a reset on success, a bounded memory, and the
429 of ``POST /token`` for a caller that reaches the service without the gateway."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from services.auth.app import create_app
from services.auth.lockout import AccountLocked, LoginLockout
from services.auth.settings import AuthSettings
from shared.lockout import LoginBackoff

READER_PASSWORD = "reader-password-123"
POLICY = LoginBackoff(free_failures=2, base_seconds=10, max_seconds=40, forget_seconds=600)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fail(lockout: LoginLockout, account: str, times: int = 1) -> None:
    for _ in range(times):
        lockout.begin(account)  # counted as failed until settled otherwise


def locked_for(lockout: LoginLockout, account: str) -> AccountLocked:
    with pytest.raises(AccountLocked) as caught:
        lockout.begin(account)
    return caught.value


def test_the_lock_doubles_with_each_failure_past_the_free_ones() -> None:
    clock = Clock()
    lockout = LoginLockout(POLICY, max_accounts=100, clock=clock)
    fail(lockout, "alice", 2)  # free
    fail(lockout, "alice")  # the third failure locks for 10 s
    locked = locked_for(lockout, "alice")
    assert (locked.retry_after, locked.lockout_seconds) == (10, 10)
    clock.now += 10
    fail(lockout, "alice")
    assert locked_for(lockout, "alice").lockout_seconds == 20
    clock.now += 20
    fail(lockout, "alice")
    assert locked_for(lockout, "alice").lockout_seconds == 40
    clock.now += 40
    fail(lockout, "alice")
    assert locked_for(lockout, "alice").lockout_seconds == 40  # the ceiling
    # Refused attempts neither count nor extend the lock.
    clock.now += 39
    assert locked_for(lockout, "alice").retry_after == pytest.approx(1)
    clock.now += 1
    lockout.begin("alice")


def test_a_success_starts_the_account_afresh() -> None:
    clock = Clock()
    lockout = LoginLockout(POLICY, max_accounts=100, clock=clock)
    fail(lockout, "alice", 3)
    clock.now += 10
    lockout.succeeded(lockout.begin("alice"))
    fail(lockout, "alice", 2)  # free again
    lockout.succeeded(lockout.begin("alice"))
    assert len(lockout) == 0


def test_failures_are_forgotten_after_a_quiet_while() -> None:
    clock = Clock()
    lockout = LoginLockout(POLICY, max_accounts=100, clock=clock)
    fail(lockout, "alice", 3)
    clock.now += 10 + 600
    fail(lockout, "alice", 2)  # a fresh count: two free failures again
    fail(lockout, "alice")
    assert locked_for(lockout, "alice").lockout_seconds == 10


def test_a_refund_gives_the_attempt_back() -> None:
    clock = Clock()
    lockout = LoginLockout(POLICY, max_accounts=100, clock=clock)
    fail(lockout, "alice", 2)
    lockout.refund(lockout.begin("alice"))  # an error, not a wrong password: no lock
    fail(lockout, "alice")
    assert locked_for(lockout, "alice").lockout_seconds == 10


def test_memory_is_bounded_and_a_spray_does_not_free_an_account_backing_off() -> None:
    clock = Clock()
    lockout = LoginLockout(POLICY, max_accounts=50, clock=clock)
    fail(lockout, "victim", 3)
    for n in range(500):
        fail(lockout, f"spray-{n}")
    assert len(lockout) == 50
    assert locked_for(lockout, "victim").lockout_seconds == 10
    # The oldest of the accounts not backing off were forgotten first, the newest kept.
    fail(lockout, "spray-0", 2)
    lockout.begin("spray-0")  # not locked: its first failure was forgotten
    fail(lockout, "spray-499", 2)
    assert locked_for(lockout, "spray-499").lockout_seconds == 10


# -- through POST /token ----------------------------------------------------------------------


@pytest.fixture
def limited(make_settings: Callable[..., AuthSettings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(login_backoff=POLICY))) as client:
        yield client


def login(client: TestClient, username: str, password: str) -> httpx.Response:
    data = {"grant_type": "password", "username": username, "password": password}
    return client.post("/token", data=data)


def test_the_token_endpoint_locks_an_account_and_the_lock_doubles(limited: TestClient) -> None:
    clock = Clock()
    service = limited.app.state.auth.service
    service.logins = LoginLockout(POLICY, max_accounts=1000, clock=clock)
    for _ in range(3):
        assert login(limited, "reader", "guess").status_code == 401
    refused = login(limited, "reader", READER_PASSWORD)  # even the right password waits
    assert refused.status_code == 429
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert refused.headers["retry-after"] == "10"
    assert refused.headers["cache-control"] == "no-store"
    body = refused.json()
    assert (body["code"], body["limit"], body["lockout_seconds"]) == ("rate_limited", "account", 10)
    # Another account is not affected; an unknown name is counted like a known one.
    assert login(limited, "demo", "demo-password").status_code == 200
    for _ in range(3):
        assert login(limited, "nobody", "guess").status_code == 401
    assert login(limited, "nobody", "guess").json()["limit"] == "account"
    clock.now += 10
    assert login(limited, "reader", "guess").status_code == 401
    assert login(limited, "reader", "guess").json()["lockout_seconds"] == 20
    clock.now += 20
    assert login(limited, "reader", READER_PASSWORD).status_code == 200
    # The success reset the count: two free failures again.
    for _ in range(2):
        assert login(limited, "reader", "guess").status_code == 401
    assert login(limited, "reader", READER_PASSWORD).status_code == 200


def test_a_malformed_request_is_not_counted(limited: TestClient) -> None:
    for _ in range(5):
        response = limited.post(
            "/token", data={"grant_type": "password", "username": "reader", "scope": "x"}
        )
        assert response.status_code == 400
    assert len(limited.app.state.auth.service.logins) == 0


@pytest.mark.parametrize(
    "backoff",
    [
        {"free_failures": 0},
        {"base_seconds": 0},
        {"max_seconds": 7200},  # no lock longer than an hour
        {"base_seconds": 30, "max_seconds": 10},
        {"forget_seconds": 10},
        {"free_failures": 3, "unknown": 1},
    ],
)
def test_unsafe_backoff_settings_are_refused(
    make_settings: Callable[..., AuthSettings], backoff: dict[str, float]
) -> None:
    with pytest.raises(ValidationError):
        make_settings(login_backoff=backoff)


def test_backoff_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTH_LOGIN_BACKOFF", '{"free_failures": 3, "max_seconds": 600}')
    monkeypatch.setenv("AUTH_LOGIN_MAX_TRACKED_ACCOUNTS", "2000")
    settings = AuthSettings()
    assert settings.login_backoff == LoginBackoff(free_failures=3, max_seconds=600)
    assert settings.login_max_tracked_accounts == 2000
    monkeypatch.delenv("AUTH_LOGIN_BACKOFF")
    # The default: five free failures, then 1 s doubled up to 15 minutes.
    assert AuthSettings().login_backoff.steps() == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 900)
    assert AuthSettings().login_backoff.free_failures == 5
