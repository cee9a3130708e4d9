"""The principal store: argon2 hashes at rest, timing-safe checks, bootstrap semantics."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from argon2 import PasswordHasher
from fastapi.testclient import TestClient

from services.auth.app import create_app
from services.auth.principals import (
    AuthFailure,
    PrincipalKind,
    PrincipalRecord,
    PrincipalStore,
    create_db_engine,
)
from services.auth.settings import AuthSettings


def _db_path(settings: AuthSettings) -> Path:
    return Path(settings.database_url.removeprefix("sqlite:///"))


def _hashes(settings: AuthSettings) -> dict[str, str]:
    with sqlite3.connect(_db_path(settings)) as db:
        return dict(db.execute("SELECT name, secret_hash FROM principals"))


def test_secrets_are_stored_as_argon2id_hashes_only(
    client: TestClient, settings: AuthSettings
) -> None:
    hashes = _hashes(settings)
    assert set(hashes) == {"demo", "reader", "indexer"}
    assert all(h.startswith("$argon2id$") for h in hashes.values())
    raw = _db_path(settings).read_bytes()
    for secret in (b"demo-password", b"reader-password-123", b"indexer-secret-0123456789"):
        assert secret not in raw


def test_bootstrap_does_not_overwrite_existing_principals(
    make_settings: Callable[..., AuthSettings],
) -> None:
    settings = make_settings()
    with TestClient(create_app(settings)):
        pass
    before = _hashes(settings)
    changed = make_settings(
        bootstrap_users=[{"username": "demo", "password": "another-password", "scopes": []}]
    )
    with TestClient(create_app(changed)) as client:
        data = {"grant_type": "password", "username": "demo", "password": "demo-password"}
        assert client.post("/token", data=data).status_code == 200
    assert _hashes(settings) == before


class _CountingHasher(PasswordHasher):
    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=64)
        self.verifications = 0
        self.hashes = 0

    def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
        self.hashes += 1
        return super().hash(password, salt=salt)

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        self.verifications += 1
        return super().verify(hash, password)


def _store(tmp_path: Path, hasher: PasswordHasher) -> PrincipalStore:
    store = PrincipalStore(create_db_engine(f"sqlite:///{tmp_path / 'p.db'}"), hasher)
    store.create_schema()
    return store


def test_unknown_names_cost_one_hash_like_known_ones(tmp_path: Path) -> None:
    hasher = _CountingHasher()
    store = _store(tmp_path, hasher)
    assert store.create_if_absent("alice", PrincipalKind.USER, "alice-password", ["admin"])

    assert store.authenticate("nobody", "whatever", PrincipalKind.USER) is AuthFailure.UNKNOWN
    assert hasher.verifications == 1
    assert store.authenticate("alice", "wrong", PrincipalKind.USER) is AuthFailure.BAD_SECRET
    assert hasher.verifications == 2
    # The right secret of the wrong kind is treated exactly like an unknown name.
    assert (
        store.authenticate("alice", "alice-password", PrincipalKind.CLIENT) is AuthFailure.UNKNOWN
    )
    assert hasher.verifications == 3

    alice = store.authenticate("alice", "alice-password", PrincipalKind.USER)
    assert isinstance(alice, PrincipalRecord)
    assert (alice.name, alice.kind, alice.scopes) == ("alice", PrincipalKind.USER, {"admin"})


def test_hashes_are_upgraded_when_the_cost_is_raised(tmp_path: Path) -> None:
    weak = _store(tmp_path, PasswordHasher(time_cost=1, memory_cost=64))
    weak.create_if_absent("alice", PrincipalKind.USER, "alice-password", [])
    stronger = _store(tmp_path, PasswordHasher(time_cost=2, memory_cost=128))
    assert isinstance(
        stronger.authenticate("alice", "alice-password", PrincipalKind.USER), PrincipalRecord
    )
    with sqlite3.connect(tmp_path / "p.db") as db:
        (stored,) = db.execute("SELECT secret_hash FROM principals").fetchone()
    assert "m=128,t=2" in stored
    assert isinstance(
        stronger.authenticate("alice", "alice-password", PrincipalKind.USER), PrincipalRecord
    )


def test_disabled_principal_is_refused_only_with_the_right_secret(tmp_path: Path) -> None:
    store = _store(tmp_path, PasswordHasher(time_cost=1, memory_cost=64))
    store.create_if_absent("svc", PrincipalKind.CLIENT, "svc-secret", ["items:read"])
    assert store.set_disabled("svc", True)
    assert store.authenticate("svc", "svc-secret", PrincipalKind.CLIENT) is AuthFailure.DISABLED
    assert store.authenticate("svc", "nope", PrincipalKind.CLIENT) is AuthFailure.BAD_SECRET
    record = store.get("svc")
    assert record is not None and record.disabled and record.created_at is not None
    assert not store.set_disabled("ghost", True)


def test_an_existing_principal_is_not_rehashed_at_bootstrap(tmp_path: Path) -> None:
    hasher = _CountingHasher()
    store = _store(tmp_path, hasher)
    hashed = hasher.hashes  # the dummy hash
    assert store.create_if_absent("alice", PrincipalKind.USER, "alice-password", [])
    assert hasher.hashes == hashed + 1
    # A restart must not pay argon2 again (nor overwrite) for principals that exist.
    assert not store.create_if_absent("alice", PrincipalKind.USER, "other-password", [])
    assert hasher.hashes == hashed + 1
