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

    def issue(
        self,
        subject: str,
        scopes: Iterable[str],
        *,
        audience: str | None = None,
        ttl_seconds: int | None = None,
    ) -> IssuedToken:
        """A token for the issuer's audience and lifetime, or for another audience (a service
        token: shared/service_auth.py) and lifetime."""
        # A callable is asked each time, so a rotated key signs from the next token on.
        ring = self._keys() if callable(self._keys) else self._keys
        key = ring.signing_key
        if key.private_key is None:  # KeyRing guarantees it; keeps the type checker honest
            raise RuntimeError("the signing key has no private key")
        now = int(self._clock())
        ttl = self.ttl_seconds if ttl_seconds is None else ttl_seconds
        scope = format_scopes(scopes)
        jti = str(uuid.uuid4())
        claims = {
            "iss": self.issuer,
            "aud": self.audience if audience is None else audience,
            "sub": subject,
            "scope": scope,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": jti,
        }
        token = jwt.encode(
            claims, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid}
        )
        return IssuedToken(
            subject=subject,
            access_token=token,
            expires_in=ttl,
            scope=scope,
            jti=jti,
            expires_at=now + ttl,
        )
