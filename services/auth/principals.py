"""Principals (users and clients) and their credentials, stored with SQLAlchemy.

Secrets are only ever stored as argon2id hashes. Verification costs one argon2 hash whatever the
outcome (an unknown name is checked against a dummy hash), so response time does not reveal
which names exist. Every method here blocks (database, argon2): call them from a thread.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import CheckConstraint, DateTime, Engine, String, create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from services.auth.scopes import format_scopes, parse_scope, unknown_scopes

log = logging.getLogger(__name__)


class PrincipalKind(StrEnum):
    USER = "user"
    CLIENT = "client"


class AuthFailure(StrEnum):
    """Why a credential check failed; the values are the ``reason`` label of the metrics."""

    UNKNOWN = "unknown_principal"
    BAD_SECRET = "bad_secret"
    DISABLED = "disabled"


class PrincipalExists(ValueError):
    """A principal with this name exists already."""


class Base(DeclarativeBase):
    """All tables of the auth database (principals, refresh tokens, revocations, keys)."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


class PrincipalRow(Base):
    __tablename__ = "principals"
    __table_args__ = (CheckConstraint("kind IN ('user', 'client')", name="ck_principals_kind"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    # One namespace for users and clients, so a token's ``sub`` is never ambiguous.
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(512))
    scopes: Mapped[str] = mapped_column(String(512), default="")  # space-separated
    disabled: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_utcnow)


@dataclass(frozen=True)
class PrincipalRecord:
    name: str
    kind: PrincipalKind
    scopes: frozenset[str]
    disabled: bool
    created_at: datetime


def _record(row: PrincipalRow) -> PrincipalRecord:
    created_at = row.created_at
    # SQLite gives back naive datetimes; every stored one is UTC.
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=UTC)
    return PrincipalRecord(
        name=row.name,
        kind=PrincipalKind(row.kind),
        scopes=parse_scope(row.scopes),
        disabled=row.disabled,
        created_at=created_at,
    )


def create_db_engine(url: str) -> Engine:
    parsed = make_url(url)
    kwargs: dict[str, object] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        # Requests reach the store from a thread pool, not the creating thread.
        kwargs["connect_args"] = {"check_same_thread": False}
    return create_engine(parsed, **kwargs)


def make_hasher(*, time_cost: int, memory_kib: int) -> PasswordHasher:
    # argon2id (argon2-cffi's default type) with the configured cost.
    return PasswordHasher(time_cost=time_cost, memory_cost=memory_kib)


class PrincipalStore:
    def __init__(self, engine: Engine, hasher: PasswordHasher) -> None:
        self._engine = engine
        self._hasher = hasher
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # Hashed with the live parameters so an unknown name costs exactly what a known one does.
        self._dummy_hash = hasher.hash(secrets.token_urlsafe(32))

    def create_schema(self) -> None:
        Base.metadata.create_all(self._engine)

    def ping(self) -> None:
        with self._engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def get(self, name: str) -> PrincipalRecord | None:
        with self._sessions() as session:
            row = session.scalar(select(PrincipalRow).where(PrincipalRow.name == name))
            return None if row is None else _record(row)

    def create_if_absent(
        self, name: str, kind: PrincipalKind, secret: str, scopes: Iterable[str]
    ) -> bool:
        """Create the principal unless the name exists (an existing one is left untouched).
        Returns whether it was created."""
        scopes = frozenset(scopes)
        unknown = unknown_scopes(scopes)
        if unknown:
            raise ValueError(f"unknown scope(s): {format_scopes(unknown)}")
        with self._sessions() as session:
            if session.scalar(select(PrincipalRow.id).where(PrincipalRow.name == name)):
                return False
            session.add(
                PrincipalRow(
                    name=name,
                    kind=kind.value,
                    secret_hash=self._hasher.hash(secret),
                    scopes=format_scopes(scopes),
                )
            )
            try:
                session.commit()
            except IntegrityError:
                session.rollback()  # another replica created it first
                return False
        return True

    def create(
        self, name: str, kind: PrincipalKind, secret: str, scopes: Iterable[str]
    ) -> PrincipalRecord:
        """Create a principal; ``PrincipalExists`` when the name is taken (by a user or a client:
        they share one namespace)."""
        if not self.create_if_absent(name, kind, secret, scopes):
            raise PrincipalExists(name)
        record = self.get(name)
        assert record is not None
        return record

    def list_all(self) -> list[PrincipalRecord]:
        with self._sessions() as session:
            rows = session.scalars(select(PrincipalRow).order_by(PrincipalRow.name))
            return [_record(row) for row in rows]

    def update(
        self,
        name: str,
        *,
        scopes: Iterable[str] | None = None,
        disabled: bool | None = None,
        secret: str | None = None,
    ) -> tuple[PrincipalRecord, PrincipalRecord] | None:
        """Change what is given; returns (before, after), or None when there is no such name."""
        new_scopes = None if scopes is None else frozenset(scopes)
        if new_scopes is not None:
            unknown = unknown_scopes(new_scopes)
            if unknown:
                raise ValueError(f"unknown scope(s): {format_scopes(unknown)}")
        new_hash = None if secret is None else self._hasher.hash(secret)
        with self._sessions() as session:
            row = session.scalar(select(PrincipalRow).where(PrincipalRow.name == name))
            if row is None:
                return None
            before = _record(row)
            if new_scopes is not None:
                row.scopes = format_scopes(new_scopes)
            if disabled is not None:
                row.disabled = disabled
            if new_hash is not None:
                row.secret_hash = new_hash
            session.commit()
            return before, _record(row)

    def set_disabled(self, name: str, disabled: bool) -> bool:
        return self.update(name, disabled=disabled) is not None

    def authenticate(
        self, name: str, secret: str, kind: PrincipalKind
    ) -> PrincipalRecord | AuthFailure:
        """The principal when ``secret`` is right and it is enabled, else why not."""
        with self._sessions() as session:
            row = session.scalar(select(PrincipalRow).where(PrincipalRow.name == name))
            if row is None or row.kind != kind.value:
                self._verify(self._dummy_hash, secret)  # same cost as a real check
                return AuthFailure.UNKNOWN
            if not self._verify(row.secret_hash, secret):
                return AuthFailure.BAD_SECRET
            # Checked after the secret, so "disabled" is only told to whoever knows the secret.
            if row.disabled:
                return AuthFailure.DISABLED
            if self._hasher.check_needs_rehash(row.secret_hash):
                # The cost parameters were raised since this hash was made: upgrade it now,
                # the only moment the clear secret is at hand.
                row.secret_hash = self._hasher.hash(secret)
                session.commit()
            return _record(row)

    def _verify(self, secret_hash: str, secret: str) -> bool:
        try:
            return self._hasher.verify(secret_hash, secret)
        except VerificationError:
            return False
        except InvalidHashError:
            log.error("a stored secret hash is not a valid argon2 hash")
            return False
