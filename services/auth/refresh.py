"""Refresh tokens for users: opaque, stored as SHA-256 hashes, rotated on every use.

Each password login starts a *family*. Using a refresh token marks it used and issues the next
one of the family; presenting a used (rotated) token again means two parties hold it, so the
whole family is revoked together with the access tokens it issued (RFC 9700 §4.14.2). A family
also ends at an absolute lifetime, whatever the rotations.

A refresh token carries 256 random bits, so a plain SHA-256 is enough to store it safely; no
slow hash is needed (nor possible: the lookup is by hash).
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import Engine, Float, String, delete, select, update
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from services.auth.principals import Base
from services.auth.scopes import ScopeError, format_scopes, parse_scope

# A recognisable prefix lets secret scanners find leaked tokens.
TOKEN_PREFIX = "cmrt_"


class RefreshTokenRow(Base):
    __tablename__ = "refresh_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    family: Mapped[str] = mapped_column(String(36), index=True)
    subject: Mapped[str] = mapped_column(String(128), index=True)
    scope: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    family_expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The access token issued together with this refresh token, revoked with its family.
    access_jti: Mapped[str | None] = mapped_column(String(64), nullable=True)
    access_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class RefreshFailure(StrEnum):
    """Why a refresh token was refused; the values label the failure metric."""

    UNKNOWN = "refresh_unknown"
    EXPIRED = "refresh_expired"
    REVOKED = "refresh_revoked"
    REUSED = "refresh_reused"


class RefreshError(Exception):
    def __init__(self, failure: RefreshFailure, revoked_access: list[tuple[str, float]]) -> None:
        super().__init__(failure.value)
        self.failure = failure
        # Access tokens (jti, exp) of a family revoked because of reuse: to be revoked too.
        self.revoked_access = revoked_access


@dataclass(frozen=True)
class RefreshGrant:
    """What a consumed refresh token allows: the next token of the same family."""

    subject: str
    scopes: frozenset[str]
    family: str
    family_expires_at: float


@dataclass(frozen=True)
class IssuedRefreshToken:
    token: str
    expires_in: int


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class RefreshTokenStore:
    def __init__(
        self,
        engine: Engine,
        *,
        ttl_seconds: int,
        max_lifetime_seconds: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self.ttl_seconds = ttl_seconds
        self.max_lifetime_seconds = max_lifetime_seconds
        self._clock = clock

    def issue(
        self,
        subject: str,
        scopes: Iterable[str],
        *,
        access_jti: str,
        access_expires_at: float,
        grant: RefreshGrant | None = None,
    ) -> IssuedRefreshToken:
        """A new refresh token: the first of a new family, or the next one of ``grant``'s."""
        now = self._clock()
        family = grant.family if grant else str(uuid.uuid4())
        family_expires_at = grant.family_expires_at if grant else now + self.max_lifetime_seconds
        expires_at = min(now + self.ttl_seconds, family_expires_at)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._sessions() as session:
            session.add(
                RefreshTokenRow(
                    token_hash=hash_token(token),
                    family=family,
                    subject=subject,
                    scope=format_scopes(scopes),
                    created_at=now,
                    expires_at=expires_at,
                    family_expires_at=family_expires_at,
                    access_jti=access_jti,
                    access_expires_at=access_expires_at,
                )
            )
            session.commit()
        return IssuedRefreshToken(token, max(0, int(expires_at - now)))

    def consume(self, token: str, requested: frozenset[str] = frozenset()) -> RefreshGrant:
        """Use a refresh token once. Raises ``RefreshError``; on reuse of a rotated token the
        whole family is revoked first and its access tokens are listed in the error. A
        ``requested`` scope beyond the family's raises ``ScopeError`` and leaves the token
        unused (RFC 6749 §6: never more than the original grant)."""
        now = self._clock()
        with self._sessions() as session:
            row = session.scalar(
                select(RefreshTokenRow).where(RefreshTokenRow.token_hash == hash_token(token))
            )
            if row is None:
                raise RefreshError(RefreshFailure.UNKNOWN, [])
            if row.revoked_at is not None:
                raise RefreshError(RefreshFailure.REVOKED, [])
            if row.used_at is not None:
                family = row.family
            elif row.expires_at <= now:
                raise RefreshError(RefreshFailure.EXPIRED, [])
            elif requested - parse_scope(row.scope):
                raise ScopeError(requested - parse_scope(row.scope))
            else:
                # Compare-and-set: of two concurrent uses only one sees used_at IS NULL.
                claimed = session.execute(
                    update(RefreshTokenRow)
                    .where(RefreshTokenRow.id == row.id, RefreshTokenRow.used_at.is_(None))
                    .values(used_at=now)
                )
                session.commit()
                if getattr(claimed, "rowcount", 0) == 1:
                    return RefreshGrant(
                        row.subject, parse_scope(row.scope), row.family, row.family_expires_at
                    )
                family = row.family
        revoked = self._revoke(RefreshTokenRow.family == family)
        raise RefreshError(RefreshFailure.REUSED, revoked)

    def revoke_family_of(self, token: str) -> list[tuple[str, float]] | None:
        """Revoke the family of ``token`` (RFC 7009); None when the token is unknown."""
        with self._sessions() as session:
            family = session.scalar(
                select(RefreshTokenRow.family).where(
                    RefreshTokenRow.token_hash == hash_token(token)
                )
            )
        if family is None:
            return None
        return self._revoke(RefreshTokenRow.family == family)

    def purge(self) -> int:
        """Delete the tokens of families past their absolute lifetime. Used tokens are kept
        until then: presenting one again must still be recognised as reuse."""
        with self._sessions() as session:
            result = session.execute(
                delete(RefreshTokenRow).where(RefreshTokenRow.family_expires_at <= self._clock())
            )
            session.commit()
            return int(getattr(result, "rowcount", 0) or 0)

    def revoke_subject(self, subject: str) -> list[tuple[str, float]]:
        return self._revoke(RefreshTokenRow.subject == subject)

    def _revoke(self, where: object) -> list[tuple[str, float]]:
        """Revoke the matching rows; returns the live access tokens they issued."""
        now = self._clock()
        with self._sessions() as session:
            rows = list(session.scalars(select(RefreshTokenRow).where(where)))  # type: ignore[arg-type]
            for row in rows:
                if row.revoked_at is None:
                    row.revoked_at = now
            session.commit()
        return [
            (row.access_jti, row.access_expires_at)
            for row in rows
            if row.access_jti and row.access_expires_at and row.access_expires_at > now
        ]
