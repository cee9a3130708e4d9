"""Access-token verification against the auth service's JWKS.

Only asymmetric algorithms are accepted, and each key only with its own algorithm, so neither
``alg: none`` nor an HS256 token "signed" with a public key can pass. An unknown ``kid``
triggers one JWKS refresh (at most once per ``min_refresh_interval``) to follow key rotation.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import jwt

from shared.http import ServiceClient
from shared.problems import Forbidden, ProblemError, Unauthorized

ALLOWED_ALGORITHMS = frozenset({"RS256", "EdDSA"})
JWKS_PATH = "/.well-known/jwks.json"


@dataclass(frozen=True)
class Principal:
    subject: str
    scopes: frozenset[str]
    token_id: str | None = None

    def require(self, *scopes: str) -> None:
        missing = [s for s in scopes if s not in self.scopes]
        if missing:
            raise Forbidden(
                f"this token lacks the scope(s): {' '.join(missing)}",
                code="insufficient_scope",
                extra={"required_scopes": list(scopes)},
            )


class TokenVerifier:
    def __init__(
        self,
        auth: ServiceClient,
        *,
        issuer: str,
        audience: str,
        leeway_seconds: float = 5.0,
        cache_seconds: float = 300.0,
        min_refresh_interval: float = 5.0,
    ) -> None:
        self._auth = auth
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway_seconds
        self.cache_seconds = cache_seconds
        self.min_refresh_interval = min_refresh_interval
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def _refresh(self, *, force: bool) -> None:
        async with self._lock:
            age = time.monotonic() - self._fetched_at
            if age < self.min_refresh_interval or (not force and age < self.cache_seconds):
                return
            response = await self._auth.request("GET", JWKS_PATH)
            keys: dict[str, jwt.PyJWK] = {}
            for entry in response.json().get("keys", []):
                try:
                    key = jwt.PyJWK.from_dict(entry)
                except jwt.PyJWTError:
                    continue  # a key type we cannot use is skipped, not fatal
                if entry.get("kid") and key.algorithm_name in ALLOWED_ALGORITHMS:
                    keys[entry["kid"]] = key
            self._keys = keys
            self._fetched_at = time.monotonic()

    async def _key_for(self, kid: str) -> jwt.PyJWK:
        await self._refresh(force=False)
        if kid not in self._keys:
            await self._refresh(force=True)
        try:
            return self._keys[kid]
        except KeyError:
            raise Unauthorized(
                "the token was signed by an unknown key", code="invalid_token"
            ) from None

    async def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("the token is malformed", code="invalid_token") from None
        kid = header.get("kid")
        if header.get("alg") not in ALLOWED_ALGORITHMS or not isinstance(kid, str):
            raise Unauthorized(
                "the token's algorithm or key id is not accepted", code="invalid_token"
            )
        try:
            key = await self._key_for(kid)
        except ProblemError as exc:
            if isinstance(exc, Unauthorized):
                raise
            raise type(exc)(
                "token keys are unavailable: " + exc.detail,
                code="auth_unavailable",
                headers=exc.headers,
            ) from exc
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[key.algorithm_name],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the token has expired", code="token_expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"the token is invalid: {exc}", code="invalid_token") from None
        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise Unauthorized("the token's scope claim is not a string", code="invalid_token")
        return Principal(
            subject=str(claims["sub"]), scopes=frozenset(scope.split()), token_id=claims.get("jti")
        )


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("an access token is required", code="missing_token")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            "the Authorization header must be 'Bearer <token>'", code="invalid_token"
        )
    return token.strip()
