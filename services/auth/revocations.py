"""Revoked access tokens, stored in the auth database and published to the gateways as a feed.

Two kinds of entry: one token (``jti``) revoked until it would have expired anyway, and "every
token of this subject issued before ``not_before``" (logout everywhere, a disabled principal,
a password change, scopes taken away). An entry is kept until ``expires_at``, when no token it
could match is still valid, so the list stays as small as the set of live revoked tokens.

Gateways poll ``GET /revocations?since=…`` (the entries created since a time) every few seconds
and keep the set in memory: revocation takes effect within one poll interval, needs no Redis,
and keeps working from the last copy while the auth service is briefly away.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, Float, Index, Integer, String, delete, select
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from services.auth.principals import Base
from shared.tokens import Principal

# The longest access-token lifetime the settings allow, plus the verifier's clock leeway: an entry
# whose token lifetime is unknown (a bare jti, a subject) is kept this long.
MAX_TOKEN_LIFETIME_SECONDS = 86400 + 60


class RevocationRow(Base):
    __tablename__ = "revocations"
    __table_args__ = (
        Index("ix_revocations_created_at", "created_at"),
        Index("ix_revocations_kind_value", "kind", "value"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))  # "jti" or "subject"
    value: Mapped[str] = mapped_column(String(128))
    not_before: Mapped[int | None] = mapped_column(Integer, nullable=True)
    expires_at: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)


@dataclass(frozen=True)
class Revocation:
    kind: str
    value: str
    expires_at: float
    not_before: int | None = None

    def as_entry(self) -> dict[str, Any]:
        """The feed's shape, which ``shared.tokens.RevocationSet.apply`` reads."""
        if self.kind == "jti":
            return {"jti": self.value, "expires_at": self.expires_at}
        return {"sub": self.value, "not_before": self.not_before, "expires_at": self.expires_at}


def _revocation(row: RevocationRow) -> Revocation:
    return Revocation(row.kind, row.value, row.expires_at, row.not_before)


class RevocationStore:
    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._clock = clock

    def _add(self, kind: str, value: str, expires_at: float, not_before: int | None) -> Revocation:
        row = RevocationRow(
            kind=kind,
            value=value,
            not_before=not_before,
            expires_at=expires_at,
            created_at=self._clock(),
        )
        with self._sessions() as session:
            session.add(row)
            session.commit()
            return _revocation(row)

    def revoke_token(self, jti: str, expires_at: float | None = None) -> Revocation:
        """Revoke one access token; without its expiry it is kept for the longest lifetime."""
        now = self._clock()
        if expires_at is None:
            expires_at = now + MAX_TOKEN_LIFETIME_SECONDS
        return self._add("jti", jti, max(expires_at + 60, now + 60), None)

    def revoke_subject(self, subject: str) -> Revocation:
        """Revoke every token of ``subject`` issued so far. ``not_before`` is the next whole
        second: ``iat`` has one-second resolution, so a token issued in the same second as the
        revocation counts as before it (a fresh login may need to wait that second)."""
        not_before = math.floor(self._clock()) + 1
        return self._add("subject", subject, not_before + MAX_TOKEN_LIFETIME_SECONDS, not_before)

    def feed(self, since: float | None) -> tuple[float, list[Revocation]]:
        """(now, the live entries created at or after ``since``; all live ones when None)."""
        now = self._clock()
        query = select(RevocationRow).where(RevocationRow.expires_at > now)
        if since is not None:
            query = query.where(RevocationRow.created_at >= since)
        with self._sessions() as session:
            rows = session.scalars(query.order_by(RevocationRow.id))
            return now, [_revocation(row) for row in rows]

    def is_revoked(self, principal: Principal) -> bool:
        """The auth service's own check (its admin endpoints), straight from the database."""
        now = self._clock()
        with self._sessions() as session:
            if principal.token_id is not None and session.scalar(
                select(RevocationRow.id).where(
                    RevocationRow.kind == "jti",
                    RevocationRow.value == principal.token_id,
                    RevocationRow.expires_at > now,
                )
            ):
                return True
            if principal.issued_at is None:
                return False
            return bool(
                session.scalar(
                    select(RevocationRow.id).where(
                        RevocationRow.kind == "subject",
                        RevocationRow.value == principal.subject,
                        RevocationRow.expires_at > now,
                        RevocationRow.not_before > principal.issued_at,
                    )
                )
            )

    def purge(self) -> int:
        """Delete entries no token can match any more."""
        with self._sessions() as session:
            result = session.execute(
                delete(RevocationRow).where(RevocationRow.expires_at <= self._clock())
            )
            session.commit()
            return int(getattr(result, "rowcount", 0) or 0)
