"""Signing keys: RFC 7638 key ids, the key file's lifecycle, the JWKS of a key ring."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient

from services.auth.app import create_app
from services.auth.keys import (
    KeyRing,
    SigningKey,
    SigningKeyError,
    jwk_thumbprint,
    load_or_create_private_key,
    rsa_public_jwk,
)
from services.auth.keystore import KeyRotationError, KeyStore, replace_private_key
from services.auth.principals import Base, create_db_engine
from services.auth.settings import AuthSettings

# The calling services' secrets, which production requires.
PRODUCTION_CLIENT_SECRETS = {"gateway_client_secret": "g" * 32, "reconcile_client_secret": "r" * 32}

# RFC 7638 §3.1: the example key and its SHA-256 thumbprint.
RFC7638_N = (
    "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPeb"
    "WKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQ"
    "MicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2N"
    "cRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
)
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_kid_is_the_rfc7638_thumbprint() -> None:
    jwk = {"kty": "RSA", "n": RFC7638_N, "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"}
    assert jwk_thumbprint(jwk) == RFC7638_THUMBPRINT


def test_public_jwk_matches_pyjwt_and_carries_kid_alg_use(rsa_pem: bytes) -> None:
    private_key = serialization.load_pem_private_key(rsa_pem, password=None)
    assert isinstance(private_key, rsa.RSAPrivateKey)
    key = SigningKey.from_private_key(private_key)
    jwk = key.public_jwk()
    reference = jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    assert (jwk["n"], jwk["e"]) == (reference["n"], reference["e"])
    assert jwk["kid"] == jwk_thumbprint(jwk) == key.kid
    assert (jwk["alg"], jwk["use"]) == ("RS256", "sig")


def test_key_ring_publishes_every_key_and_the_newest_signs() -> None:
    newest = SigningKey.from_private_key(rsa.generate_private_key(65537, 2048))
    retired = SigningKey.from_public_key(rsa.generate_private_key(65537, 2048).public_key())
    ring = KeyRing([newest, retired])
    assert ring.signing_key is newest
    assert [k["kid"] for k in ring.jwks()["keys"]] == [newest.kid, retired.kid]
    with pytest.raises(SigningKeyError):
        KeyRing([retired, newest])  # the signing key must hold its private key
    with pytest.raises(SigningKeyError):
        KeyRing([])


def test_development_generates_a_private_key_file(tmp_path: Path) -> None:
    path = tmp_path / "new" / "signing-key.pem"
    key = load_or_create_private_key(path, create=True)
    assert key.key_size >= 2048
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert loaded.private_numbers() == key.private_numbers()
    assert [p.name for p in path.parent.iterdir()] == ["signing-key.pem"]  # no temp file left


def test_key_is_persisted_and_reused_across_restarts(
    make_settings: Callable[..., AuthSettings],
) -> None:
    settings = make_settings(write_key=False)
    assert not settings.private_key_path.exists()
    with TestClient(create_app(settings)) as first:
        kid = first.get("/.well-known/jwks.json").json()["keys"][0]["kid"]
        token = first.post(
            "/token",
            data={"grant_type": "password", "username": "demo", "password": "demo-password"},
        ).json()["access_token"]
    assert stat.S_IMODE(settings.private_key_path.stat().st_mode) == 0o600
    pem = settings.private_key_path.read_bytes()

    with TestClient(create_app(settings)) as second:
        (jwk,) = second.get("/.well-known/jwks.json").json()["keys"]
    assert jwk["kid"] == kid
    assert settings.private_key_path.read_bytes() == pem
    # A token from before the restart still verifies.
    claims = jwt.decode(
        token,
        key=jwt.PyJWK.from_dict(jwk).key,
        algorithms=["RS256"],
        audience="crossmodal-gateway",
    )
    assert claims["sub"] == "demo"


def test_production_refuses_to_start_without_a_key(
    make_settings: Callable[..., AuthSettings],
) -> None:
    settings = make_settings(
        write_key=False,
        environment="production",
        argon2_time_cost=2,
        argon2_memory_kib=19 * 1024,
        bootstrap_users=[{"username": "ops", "password": "a-strong-password!", "scopes": []}],
        bootstrap_clients=[],
        **PRODUCTION_CLIENT_SECRETS,
    )
    with pytest.raises(SigningKeyError, match="does not exist"), TestClient(create_app(settings)):
        pass
    assert not settings.private_key_path.exists()  # not invented in production


def test_production_starts_with_a_provisioned_key(
    make_settings: Callable[..., AuthSettings], rsa_pem: bytes
) -> None:
    settings = make_settings(
        environment="production",
        argon2_time_cost=2,
        argon2_memory_kib=19 * 1024,
        bootstrap_users=[],
        bootstrap_clients=[],
        **PRODUCTION_CLIENT_SECRETS,
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
    assert settings.private_key_path.read_bytes() == rsa_pem


def test_unreadable_key_is_a_startup_error_and_is_not_replaced(
    make_settings: Callable[..., AuthSettings],
) -> None:
    settings = make_settings(write_key=False)
    settings.private_key_path.parent.mkdir(parents=True)
    settings.private_key_path.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
    with pytest.raises(SigningKeyError, match="not an unencrypted PEM"):
        load_or_create_private_key(settings.private_key_path, create=True)
    assert settings.private_key_path.read_bytes().endswith(b"garbage\n")


def test_short_rsa_key_is_refused(tmp_path: Path) -> None:
    weak = rsa.generate_private_key(65537, 1024)
    path = tmp_path / "weak.pem"
    path.write_bytes(
        weak.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(SigningKeyError, match="2048"):
        load_or_create_private_key(path, create=True)


def test_public_jwk_has_no_private_members(rsa_pem: bytes) -> None:
    private_key = serialization.load_pem_private_key(rsa_pem, password=None)
    assert isinstance(private_key, rsa.RSAPrivateKey)
    assert set(rsa_public_jwk(private_key.public_key())) == {"kty", "n", "e"}


def test_a_world_readable_key_is_loaded_with_a_warning(
    tmp_path: Path, rsa_pem: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(rsa_pem)
    path.chmod(0o440)  # how Kubernetes mounts it for the pod's group: no warning
    load_or_create_private_key(path, create=False)
    assert "accessible to every user" not in caplog.text
    path.chmod(0o644)
    assert load_or_create_private_key(path, create=False).key_size == 2048
    assert "accessible to every user" in caplog.text


# -- rotation with overlap (KeyStore) ----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _store(tmp_path: Path, clock: Clock, **kwargs: object) -> KeyStore:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    Base.metadata.create_all(engine)
    options: dict[str, object] = {"create": True, "retention_seconds": 600, "check_interval": 0}
    options.update(kwargs)
    return KeyStore(engine, tmp_path / "key.pem", clock=clock, **options)  # type: ignore[arg-type]


def _kids(store: KeyStore) -> list[str]:
    return [k["kid"] for k in store.ring().jwks()["keys"]]


def test_a_rotated_key_stays_published_for_the_retention_then_goes(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    old = store.load().signing_key.kid
    rotation = store.rotate()
    assert rotation.previous_kid == old and rotation.kid != old
    assert rotation.previous_published_until == clock.now + 600
    assert _kids(store) == [rotation.kid, old]
    assert store.ring().signing_key.kid == rotation.kid
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".key")] == []  # no temp
    clock.now += 599
    assert _kids(store) == [rotation.kid, old]
    clock.now += 2
    store._synced = float("-inf")  # the next check re-reads the database
    assert _kids(store) == [rotation.kid]
    info = {k.kid: k for k in store.describe()}
    assert not info[old].published and info[old].retired_at is not None
    assert info[rotation.kid].signing


def test_a_new_key_file_is_picked_up_and_the_old_key_retired(
    tmp_path: Path, rsa_pem: bytes
) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    old = store.load().signing_key.kid
    # What a Kubernetes secret update does: another key appears at the path.
    replace_private_key(
        tmp_path / "key.pem", serialization.load_pem_private_key(rsa_pem, password=None)
    )
    new = store.ring().signing_key.kid
    assert new != old
    assert _kids(store) == [new, old]
    # A second process (another replica, a restart) publishes the same set.
    other = _store(tmp_path, clock)
    assert [k["kid"] for k in other.load().jwks()["keys"]] == [new, old]


def test_rolling_back_to_an_older_key_reactivates_it(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    first = store.load().signing_key
    first_pem = (tmp_path / "key.pem").read_bytes()
    clock.now += 1
    second = store.rotate().kid
    clock.now += 1
    (tmp_path / "key.pem").write_bytes(first_pem)
    assert store.ring().signing_key.kid == first.kid
    info = {k.kid: k for k in store.describe()}
    assert info[first.kid].retired_at is None and info[first.kid].signing
    assert info[second].retired_at is not None and info[second].published


def test_rotation_on_a_read_only_file_system_fails_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    old = store.load().signing_key.kid
    before = (tmp_path / "key.pem").read_bytes()

    def read_only(*_: object) -> None:
        # A mounted secret is read-only even for root; chmod cannot reproduce that here.
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("services.auth.keys.os.replace", read_only)
    with pytest.raises(KeyRotationError, match="cannot write"):
        store.rotate()
    assert (tmp_path / "key.pem").read_bytes() == before
    assert store.ring().signing_key.kid == old
    assert _kids(store) == [old]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".key")] == []


def test_a_broken_new_key_file_keeps_the_current_key(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    kid = store.load().signing_key.kid
    (tmp_path / "key.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nhalf a key")
    assert store.ring().signing_key.kid == kid  # logged, not fatal: signing goes on


def test_retention_must_cover_the_token_lifetime(
    make_settings: Callable[..., AuthSettings],
) -> None:
    with pytest.raises(ValueError, match="KEY_RETENTION"):
        make_settings(access_token_ttl_seconds=900, key_retention_seconds=600)
    assert make_settings(access_token_ttl_seconds=900).effective_key_retention_seconds == 1200
