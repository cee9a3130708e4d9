"""Access tokens: RS256 JWTs with the claims docs/architecture.md ("Scopes") lists."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import jwt

from services.auth.keys import KeyRing
from services.auth.scopes import format_scopes


@dataclass(frozen=True)
class IssuedToken:
    subject: str
    access_token: str
    expires_in: int
    scope: str
    jti: str
    expires_at: int


class TokenIssuer:
    def __init__(
        self,
        keys: KeyRing | Callable[[], KeyRing],
        *,
        issuer: str,
        audience: str,
        ttl_seconds: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys
        self.issuer = issuer
        self.audience = audience
        self.ttl_seconds = ttl_seconds
        self._clock = clock

    def issue(self, subject: str, scopes: Iterable[str]) -> IssuedToken:
        # A callable is asked each time, so a rotated key signs from the next token on.
        ring = self._keys() if callable(self._keys) else self._keys
        key = ring.signing_key
        if key.private_key is None:  # KeyRing guarantees it; keeps the type checker honest
            raise RuntimeError("the signing key has no private key")
        now = int(self._clock())
        scope = format_scopes(scopes)
        jti = str(uuid.uuid4())
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "scope": scope,
            "iat": now,
            "nbf": now,
            "exp": now + self.ttl_seconds,
            "jti": jti,
        }
        token = jwt.encode(
            claims, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid}
        )
        return IssuedToken(
            subject=subject,
            access_token=token,
            expires_in=self.ttl_seconds,
            scope=scope,
            jti=jti,
            expires_at=now + self.ttl_seconds,
        )
