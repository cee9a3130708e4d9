"""Signing-key rotation with overlap.

The private key of the *current* signing key lives in one file (``AUTH_PRIVATE_KEY_PATH``: a
mounted secret in production, generated in development). Every public key the service has ever
signed with is recorded in the auth database (``signing_keys``), so the JWKS of every replica
and of every restart publishes:

- the current key (it signs every new token),
- any other key still active on another replica (a rolling update in progress),
- every retired key for ``retention_seconds`` after its retirement (the longest access-token
  lifetime plus a margin), so the tokens it signed stay verifiable until they expire.

A key is retired when a newer key becomes current anywhere: rotated by the admin command or
endpoint (which write a new key file), or a new secret mounted at the key path. The running
service notices a changed key file within ``check_interval`` seconds; no restart is needed. Retired
private keys are gone with the old file: only public keys are kept.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import Engine, Float, String, Text, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from services.auth.keys import (
    GENERATED_RSA_BITS,
    KeyRing,
    SigningKey,
    SigningKeyError,
    load_or_create_private_key,
    write_private_key,
)
from services.auth.principals import Base

log = logging.getLogger(__name__)

# How often the public keys of other replicas are re-read from the database.
DB_REFRESH_SECONDS = 10.0


class SigningKeyRow(Base):
    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_jwk: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    retired_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class KeyRotationError(RuntimeError):
    """The key file cannot be replaced (e.g. a read-only secret mount)."""


@dataclass(frozen=True)
class KeyInfo:
    kid: str
    created_at: float
    retired_at: float | None
    signing: bool
    published: bool
    published_until: float | None


@dataclass(frozen=True)
class Rotation:
    kid: str
    previous_kid: str
    previous_published_until: float


def _public_key(jwk_json: str) -> SigningKey:
    from jwt.algorithms import RSAAlgorithm

    public = RSAAlgorithm.from_jwk(jwk_json)
    if not isinstance(public, rsa.RSAPublicKey):
        raise SigningKeyError("a stored public key is not an RSA public key")
    return SigningKey.from_public_key(public)


def _file_state(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()  # follows symlinks: a Kubernetes secret update swaps the link target
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def replace_private_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    """Write ``key`` over ``path`` atomically (0600 temp file, fsync, rename, fsync dir)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private_key(path, pem, replace=True)


class KeyStore:
    """The key ring of the running service, kept in step with the key file and the database.
    Blocking (file, database, RSA generation): call from a thread."""

    def __init__(
        self,
        engine: Engine,
        private_key_path: Path,
        *,
        create: bool,
        retention_seconds: float,
        check_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self.path = private_key_path
        self.create = create
        self.retention_seconds = retention_seconds
        self.check_interval = check_interval
        self._clock = clock
        self._lock = threading.RLock()
        self._ring: KeyRing | None = None
        self._file: tuple[int, int, int] | None = None
        self._checked = float("-inf")
        self._synced = float("-inf")

    def load(self) -> KeyRing:
        """Load the key file (creating it in development) and publish it: the startup step,
        which raises ``SigningKeyError`` when the key is missing or unusable."""
        with self._lock:
            return self._reload()

    def ring(self) -> KeyRing:
        """The current ring; re-read when the key file changed or the database view is old.
        A failed reload keeps the previous ring (a half-swapped secret must not stop signing)."""
        with self._lock:
            now = time.monotonic()
            if self._ring is not None and now - self._checked < self.check_interval:
                return self._ring
            self._checked = now
            try:
                if self._ring is None or _file_state(self.path) != self._file:
                    return self._reload()
                if now - self._synced >= DB_REFRESH_SECONDS:
                    self._ring = self._sync(self._ring.signing_key)
                    self._synced = now
            except Exception:
                if self._ring is None:
                    raise
                log.exception("could not reload the signing keys; keeping the current ones")
            return self._ring

    def _reload(self) -> KeyRing:
        state = _file_state(self.path)
        private_key = load_or_create_private_key(self.path, create=self.create)
        current = SigningKey.from_private_key(private_key)
        previous = self._ring.signing_key.kid if self._ring else None
        self._ring = self._sync(current)
        self._file = _file_state(self.path) if state is None else state
        self._synced = time.monotonic()
        if previous and previous != current.kid:
            log.info("signing key changed: %s -> %s", previous, current.kid)
        return self._ring

    def _sync(self, current: SigningKey) -> KeyRing:
        """Record ``current`` as the active key, retire older active ones, and build the ring."""
        for attempt in range(2):
            try:
                return self._sync_once(current)
            except IntegrityError:
                if attempt:  # another replica inserted the same key at the same moment
                    raise
        raise AssertionError("unreachable")

    def _sync_once(self, current: SigningKey) -> KeyRing:
        now = self._clock()
        with self._sessions() as session:
            row = session.get(SigningKeyRow, current.kid)
            # A key that becomes current is the newest, even within the clock's resolution.
            latest = session.scalar(select(func.max(SigningKeyRow.created_at)))
            newest = now if latest is None or now > latest else latest + 0.001
            if row is None:
                row = SigningKeyRow(
                    kid=current.kid,
                    public_jwk=json.dumps(current.public_jwk()),
                    created_at=newest,
                    retired_at=None,
                )
                session.add(row)
            elif row.retired_at is not None:
                # Rolled back to an older key: it becomes the newest active one again.
                row.retired_at = None
                row.created_at = newest
            for other in session.scalars(
                select(SigningKeyRow).where(
                    SigningKeyRow.retired_at.is_(None),
                    SigningKeyRow.kid != current.kid,
                    SigningKeyRow.created_at < row.created_at,
                )
            ):
                other.retired_at = now
                log.info("retired signing key %s; published until its tokens expire", other.kid)
            session.commit()
            others = session.scalars(
                select(SigningKeyRow)
                .where(SigningKeyRow.kid != current.kid)
                .order_by(SigningKeyRow.created_at.desc())
            )
            published = [
                _public_key(other.public_jwk) for other in others if self._published(other, now)
            ]
        return KeyRing([current, *published])

    def _published(self, row: SigningKeyRow, now: float) -> bool:
        return row.retired_at is None or row.retired_at + self.retention_seconds > now

    def rotate(self) -> Rotation:
        """Generate a new signing key, write it over the key file and publish it; the previous
        key stays published for ``retention_seconds``."""
        with self._lock:
            old = (self._ring or self._reload()).signing_key
            new_key = rsa.generate_private_key(public_exponent=65537, key_size=GENERATED_RSA_BITS)
            try:
                replace_private_key(self.path, new_key)
            except OSError as exc:
                raise KeyRotationError(
                    f"cannot write the new signing key to {self.path}: {exc.strerror}; with a "
                    "read-only secret, rotate by mounting a new secret there instead"
                ) from exc
            ring = self._reload()
            log.info("rotated the signing key: %s -> %s", old.kid, ring.signing_key.kid)
            return Rotation(
                kid=ring.signing_key.kid,
                previous_kid=old.kid,
                previous_published_until=self._clock() + self.retention_seconds,
            )

    def describe(self) -> list[KeyInfo]:
        ring = self.ring()
        now = self._clock()
        with self._sessions() as session:
            rows = list(
                session.scalars(select(SigningKeyRow).order_by(SigningKeyRow.created_at.desc()))
            )
        return [
            KeyInfo(
                kid=row.kid,
                created_at=row.created_at,
                retired_at=row.retired_at,
                signing=row.kid == ring.signing_key.kid,
                published=self._published(row, now),
                published_until=(
                    None if row.retired_at is None else row.retired_at + self.retention_seconds
                ),
            )
            for row in rows
        ]
