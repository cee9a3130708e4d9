"""What the auth app's lifespan builds and its routes (token, admin) share."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import jwt
from fastapi import Request

from services.auth.keystore import KeyStore
from services.auth.service import AuthService
from services.auth.service_clients import ServiceClients
from services.auth.settings import AuthSettings
from shared.problems import ServiceUnavailable
from shared.tokens import Principal, TokenVerifier, parse_jwks, token_revoked

T = TypeVar("T")


class LocalKeySource:
    """The service's own key ring as a ``shared.tokens.KeySource``."""

    def __init__(self, keys: KeyStore) -> None:
        self._keys = keys
        self._cache: tuple[object, dict[str, jwt.PyJWK]] | None = None

    async def key(self, kid: str) -> jwt.PyJWK | None:
        ring = await anyio.to_thread.run_sync(self._keys.ring)
        if self._cache is None or self._cache[0] is not ring:
            self._cache = (ring, parse_jwks(ring.jwks()))
        return self._cache[1].get(kid)


class OwnKeys:
    """The service's own key ring as a ``shared.tokens.KeySource`` once the lifespan has loaded
    it (``use``): what the service tokens of the revocation feed are checked against."""

    def __init__(self) -> None:
        self._source: LocalKeySource | None = None

    def use(self, keys: KeyStore | None) -> None:
        self._source = None if keys is None else LocalKeySource(keys)

    async def key(self, kid: str) -> jwt.PyJWK | None:
        if self._source is None:
            raise ServiceUnavailable("the auth service is not started", code="not_ready")
        return await self._source.key(kid)


class DatabaseRevocations:
    """The revocation check of the auth service itself: straight from its database."""

    def __init__(self, service: AuthService) -> None:
        self._service = service

    async def check(self, principal: Principal) -> None:
        if await anyio.to_thread.run_sync(self._service.is_revoked, principal):
            raise token_revoked()


@dataclass
class AuthRuntime:
    """Everything the lifespan builds and the routes use."""

    settings: AuthSettings
    service: AuthService
    verifier: TokenVerifier
    # The calling services' client-credentials grant (service tokens).
    service_clients: ServiceClients
    # argon2 is CPU- and memory-heavy: bound the hashes running at once so a burst of logins
    # queues instead of exhausting memory (64 MiB each by default) or every core.
    hash_limiter: anyio.CapacityLimiter

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking domain call in a worker thread."""
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))

    async def run_hashing(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a domain call that verifies an argon2 hash, within the hashing limit."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.hash_limiter)


def get_runtime(request: Request) -> AuthRuntime:
    found: AuthRuntime | None = getattr(request.app.state, "auth", None)
    if found is None:
        raise ServiceUnavailable("the auth service is not started", code="not_ready")
    return found
