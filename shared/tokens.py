"""Access-token verification: against the auth service's JWKS (the gateway) or a local key ring
(the auth service itself), plus the revocation list both consult.

Only asymmetric algorithms are accepted, and each key only with its own algorithm, so neither
``alg: none`` nor an HS256 token "signed" with a public key can pass. An unknown ``kid``
triggers one JWKS refresh (at most once per ``min_refresh_interval``) to follow key rotation.
A token must carry ``exp``, ``iat``, ``iss``, ``aud``, ``sub`` and ``jti``; ``nbf`` and ``iat``
in the future are refused, so is a revoked ``jti`` or a token of a subject whose tokens were
all revoked after it was issued.

With ``memo_size`` the verifier remembers the principal of each token it accepted (by the
token's SHA-256, at most ``memo_size`` of them, least recently used out) until the token's
``exp``: a client that sends the same token again is not verified again. The revocation check
still runs on every call, and a remembered token is verified again once its key is no longer
the one the key source gives for its ``kid`` (rotation, a JWKS refresh).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import jwt

from shared.http import ServiceClient
from shared.problems import Forbidden, ProblemError, ServiceUnavailable, Unauthorized

ALLOWED_ALGORITHMS = frozenset({"RS256", "EdDSA"})
JWKS_PATH = "/.well-known/jwks.json"
REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud", "sub", "jti")


@dataclass(frozen=True)
class Principal:
    subject: str
    scopes: frozenset[str]
    token_id: str | None = None
    issued_at: int | None = None
    expires_at: int | None = None

    def require(self, *scopes: str) -> None:
        missing = [s for s in scopes if s not in self.scopes]
        if missing:
            raise Forbidden(
                f"this token lacks the scope(s): {' '.join(missing)}",
                code="insufficient_scope",
                extra={"required_scopes": list(scopes)},
            )


class KeySource(Protocol):
    """Where the verification keys come from."""

    async def key(self, kid: str) -> jwt.PyJWK | None:
        """The key with this id, or None when there is none (after any refresh)."""
        ...


class RevocationCheck(Protocol):
    async def check(self, principal: Principal) -> None:
        """Raise a problem (``token_revoked``) when the principal's token is revoked."""
        ...


def parse_jwks(document: Mapping[str, Any]) -> dict[str, jwt.PyJWK]:
    """The usable keys of a JWKS by kid; key types or algorithms we do not accept are skipped."""
    keys: dict[str, jwt.PyJWK] = {}
    for entry in document.get("keys", []):
        if not isinstance(entry, dict):
            continue
        try:
            key = jwt.PyJWK.from_dict(entry)
        except jwt.PyJWTError:
            continue  # a key type we cannot use is skipped, not fatal
        if entry.get("kid") and key.algorithm_name in ALLOWED_ALGORITHMS:
            keys[entry["kid"]] = key
    return keys


class JwksKeySource:
    """The auth service's JWKS over HTTP, cached for ``cache_seconds`` and refreshed at once
    (rate-limited) when a token names a key id it does not know: that is how a rotated key is
    picked up."""

    def __init__(
        self,
        auth: ServiceClient,
        *,
        cache_seconds: float = 300.0,
        min_refresh_interval: float = 5.0,
    ) -> None:
        self._auth = auth
        self.cache_seconds = cache_seconds
        self.min_refresh_interval = min_refresh_interval
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def _refresh(self, *, force: bool) -> None:
        if not force and time.monotonic() - self._fetched_at < self.cache_seconds:
            return  # the common case, without the lock
        async with self._lock:
            age = time.monotonic() - self._fetched_at
            if age < self.min_refresh_interval or (not force and age < self.cache_seconds):
                return
            response = await self._auth.request("GET", JWKS_PATH)
            self._keys = parse_jwks(response.json())
            self._fetched_at = time.monotonic()

    async def key(self, kid: str) -> jwt.PyJWK | None:
        await self._refresh(force=False)
        if kid not in self._keys:
            await self._refresh(force=True)
        return self._keys.get(kid)


@dataclass(frozen=True)
class _Verified:
    """A token the verifier accepted: its principal, the key that verified it, and until when
    (its ``exp``, wall clock) it may be trusted without checking its signature again."""

    principal: Principal
    kid: str
    key: jwt.PyJWK
    expires_at: float


class TokenVerifier:
    def __init__(
        self,
        keys: ServiceClient | KeySource,
        *,
        issuer: str,
        audience: str,
        leeway_seconds: float = 5.0,
        cache_seconds: float = 300.0,
        min_refresh_interval: float = 5.0,
        revocations: RevocationCheck | None = None,
        memo_size: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(keys, ServiceClient):
            keys = JwksKeySource(
                keys, cache_seconds=cache_seconds, min_refresh_interval=min_refresh_interval
            )
        self._keys = keys
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway_seconds
        self.revocations = revocations
        self.memo_size = memo_size
        self._clock = clock
        self._memo: OrderedDict[bytes, _Verified] = OrderedDict()

    async def _key_for(self, kid: str) -> jwt.PyJWK:
        try:
            key = await self._keys.key(kid)
        except ProblemError as exc:
            raise ServiceUnavailable(
                "token keys are unavailable: " + exc.detail,
                code="auth_unavailable",
                headers=exc.headers or {"Retry-After": "1"},
            ) from exc
        if key is None:
            raise Unauthorized("the token was signed by an unknown key", code="invalid_token")
        return key

    async def verify(self, token: str) -> Principal:
        digest = hashlib.sha256(token.encode()).digest() if self.memo_size > 0 else b""
        principal = await self._remembered(digest)
        if principal is not None:
            return principal
        principal, verified = await self._verify(token)
        if self.memo_size > 0:
            self._memo[digest] = verified
            if len(self._memo) > self.memo_size:
                self._memo.popitem(last=False)
        if self.revocations is not None:
            await self.revocations.check(principal)
        return principal

    async def remembered(self, token: str) -> Principal | None:
        """The principal of ``token`` if it was verified before and may still be trusted
        without checking its signature again (then its revocation is checked); else None."""
        if self.memo_size <= 0:
            return None
        return await self._remembered(hashlib.sha256(token.encode()).digest())

    async def _remembered(self, digest: bytes) -> Principal | None:
        if self.memo_size <= 0:
            return None
        entry = self._memo.get(digest)
        if entry is None:
            return None
        # Past ``exp`` the full check decides (it allows the leeway, then says token_expired).
        if self._clock() >= entry.expires_at or await self._key_for(entry.kid) is not entry.key:
            self._memo.pop(digest, None)
            return None
        self._memo.move_to_end(digest)
        if self.revocations is not None:
            await self.revocations.check(entry.principal)
        return entry.principal

    async def _verify(self, token: str) -> tuple[Principal, _Verified]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("the token is malformed", code="invalid_token") from None
        kid = header.get("kid")
        if header.get("alg") not in ALLOWED_ALGORITHMS or not isinstance(kid, str):
            raise Unauthorized(
                "the token's algorithm or key id is not accepted", code="invalid_token"
            )
        key = await self._key_for(kid)
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[key.algorithm_name],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": list(REQUIRED_CLAIMS)},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the token has expired", code="token_expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"the token is invalid: {exc}", code="invalid_token") from None
        scope = claims.get("scope", "")
        if not isinstance(scope, str) or not isinstance(claims["jti"], str):
            raise Unauthorized(
                "the token's scope or jti claim is not a string", code="invalid_token"
            )
        principal = Principal(
            subject=str(claims["sub"]),
            scopes=frozenset(scope.split()),
            token_id=claims["jti"],
            issued_at=int(claims["iat"]),
            expires_at=int(claims["exp"]),
        )
        return principal, _Verified(principal, kid, key, float(claims["exp"]))


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("an access token is required", code="missing_token")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            "the Authorization header must be 'Bearer <token>'", code="invalid_token"
        )
    return token.strip()


def token_revoked() -> Unauthorized:
    return Unauthorized("the token has been revoked", code="token_revoked")


@dataclass
class RevocationSet:
    """Revoked token ids and per-subject "not before" times, each kept until ``expires_at``
    (when every token it could match has expired anyway).

    The feed entries are ``{"jti", "expires_at"}`` or ``{"sub", "not_before", "expires_at"}``.
    A subject entry revokes every token of that subject issued before ``not_before``.
    """

    jtis: dict[str, float] = field(default_factory=dict)
    subjects: dict[str, tuple[int, float]] = field(default_factory=dict)

    def apply(self, entries: Iterable[Mapping[str, Any]]) -> None:
        for entry in entries:
            expires_at = float(entry["expires_at"])
            if "jti" in entry:
                jti = str(entry["jti"])
                self.jtis[jti] = max(expires_at, self.jtis.get(jti, 0.0))
            elif "sub" in entry:
                sub = str(entry["sub"])
                not_before, old_expiry = self.subjects.get(sub, (0, 0.0))
                self.subjects[sub] = (
                    max(not_before, int(entry["not_before"])),
                    max(old_expiry, expires_at),
                )

    def prune(self, now: float) -> None:
        self.jtis = {k: v for k, v in self.jtis.items() if v > now}
        self.subjects = {k: v for k, v in self.subjects.items() if v[1] > now}

    def is_revoked(self, principal: Principal) -> bool:
        if principal.token_id is not None and principal.token_id in self.jtis:
            return True
        entry = self.subjects.get(principal.subject)
        return (
            entry is not None and principal.issued_at is not None and principal.issued_at < entry[0]
        )
