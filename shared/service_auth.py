"""Service-to-service authentication, the callee's side: which service may call what, and the
check every internal service makes before any other work.

The internal services (feature, retrieval, metadata, and auth's revocation feed) answer only a
caller that shows a service token: a short-lived JWT from auth's client-credentials grant
(``audience=crossmodal:<service>``; ``shared.service_tokens`` obtains them), signed by a key of
auth's JWKS, issued for this service's audience, not expired, and carrying the scope the route
names. ``CALLERS`` is the whole policy: each calling service, the services it calls, and the
scopes it gets there (docs/security.md, "Service-to-service authentication").

``ServiceTokenMiddleware`` refuses every request without a valid token before any routing or
body parsing; only ``/healthz``, ``/readyz`` and ``/metrics`` (and what a service names as open:
auth's token endpoints, JWKS and user-token admin routes) pass without one. Each route then
names its scope with ``caller("retrieval:write")``, which also documents the requirement in the
service's OpenAPI (scheme ``ServiceToken``). Verified tokens are remembered until their ``exp``
(``TokenVerifier``'s memo): a caller sends the same token for minutes, and each request then
costs a SHA-256 and a dictionary lookup.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.openapi.models import HTTPBearer as HTTPBearerModel
from fastapi.security import SecurityScopes
from fastapi.security.base import SecurityBase
from pydantic import Field
from starlette.types import ASGIApp, Receive, Scope, Send

from shared.http import ServiceClient
from shared.problems import ProblemError, ServiceUnavailable, Unauthorized, problem_response
from shared.settings import ServiceSettings
from shared.tokens import JwksKeySource, KeySource, Principal, TokenVerifier, bearer_token

# What each internal service's scopes allow, by service (the audience ``crossmodal:<service>``).
SERVICE_SCOPES: dict[str, dict[str, str]] = {
    "auth": {"auth:revocations": "read the revocation feed"},
    "feature": {"feature:embed": "embed texts and images; read the model's id"},
    "retrieval": {
        "retrieval:search": "search a collection's vectors",
        "retrieval:read": "read collections and list their ids",
        "retrieval:write": "create collections; upsert and delete vectors",
    },
    "metadata": {
        "metadata:read": "read items, images, captions and collections; filter and rank",
        "metadata:write": "add, change and delete items and collections",
    },
}

# Who may call what: each calling service (its client id), the services it calls, and the
# scopes its tokens for each carry. Nothing else can get a token for an internal audience.
CALLERS: dict[str, dict[str, frozenset[str]]] = {
    "gateway": {
        "auth": frozenset({"auth:revocations"}),
        "feature": frozenset({"feature:embed"}),
        # retrieval:read: the drift repair of its background maintenance lists vector ids.
        "retrieval": frozenset({"retrieval:search", "retrieval:read", "retrieval:write"}),
        "metadata": frozenset({"metadata:read", "metadata:write"}),
    },
    # crossmodal reconcile, and the operator tools of a local stack.
    "reconcile": {
        "feature": frozenset({"feature:embed"}),
        "retrieval": frozenset({"retrieval:read", "retrieval:write"}),
        "metadata": frozenset({"metadata:read", "metadata:write"}),
    },
}

# Each caller's secret outside production when none is configured; production refuses them.
DEVELOPMENT_CLIENT_SECRETS = {caller: f"development-only-{caller}-secret" for caller in CALLERS}
MIN_PRODUCTION_CLIENT_SECRET_LENGTH = 32

# Probes and scrapes: no token (the kubelet and Prometheus have none).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_CALLER_STATE = "service_caller"
# Tokens remembered per service: a few callers, one live token each (two around a refresh).
_MEMO_SIZE = 256


def audience(service: str) -> str:
    """The ``aud`` of tokens for ``service``."""
    return f"crossmodal:{service}"


def service_of(audience_value: str) -> str | None:
    """The internal service an audience names; None for anything else."""
    prefix, _, service = audience_value.partition(":")
    return service if prefix == "crossmodal" and service in SERVICE_SCOPES else None


def check_client_secret(caller: str, secret: str, *, production: bool) -> str | None:
    """Why ``secret`` may not be ``caller``'s client secret; None when it may."""
    if not secret:
        return f"the {caller} client secret is empty"
    if production:
        if hmac.compare_digest(secret, DEVELOPMENT_CLIENT_SECRETS[caller]):
            return f"the {caller} client secret is the development default"
        if len(secret) < MIN_PRODUCTION_CLIENT_SECRET_LENGTH:
            return (
                f"the {caller} client secret is shorter than "
                f"{MIN_PRODUCTION_CLIENT_SECRET_LENGTH} characters"
            )
    return None


class InternalServiceSettings(ServiceSettings):
    """The settings of a service that only our services call: where its callers' tokens are
    verified (auth's JWKS) and by whom they must be issued."""

    auth_url: str = "http://127.0.0.1:8001"
    jwt_issuer: str = Field("crossmodal-auth", min_length=1)


class CallerVerifier:
    """Checks the service tokens sent to ``service``: signature (auth's JWKS, or ``keys``),
    issuer, audience ``crossmodal:<service>``, expiry. ``start`` and ``aclose`` bracket the
    app's lifespan (``shared.app.build_app`` does it)."""

    def __init__(
        self,
        service: str,
        *,
        issuer: str,
        auth_url: str | None = None,
        keys: KeySource | None = None,
        open_paths: Iterable[str] = (),
        open_prefixes: tuple[str, ...] = (),
    ) -> None:
        if service not in SERVICE_SCOPES:
            raise ValueError(f"{service!r} is not an internal service")
        if keys is None and auth_url is None:
            raise ValueError("a key source or the auth service's URL is needed")
        self.service = service
        self.audience = audience(service)
        self.open_paths = OPEN_PATHS | frozenset(open_paths)
        self.open_prefixes = open_prefixes
        self._issuer = issuer
        self._auth_url = auth_url
        self._keys = keys
        self._client: ServiceClient | None = None
        self._verifier: TokenVerifier | None = None

    @classmethod
    def for_settings(
        cls, service: str, settings: InternalServiceSettings, *, keys: KeySource | None = None
    ) -> CallerVerifier:
        return cls(service, issuer=settings.jwt_issuer, auth_url=settings.auth_url, keys=keys)

    async def start(self) -> None:
        keys = self._keys
        if keys is None:
            assert self._auth_url is not None
            self._client = ServiceClient("auth", self._auth_url, timeout=5.0)
            keys = JwksKeySource(self._client)
        self._verifier = TokenVerifier(
            keys, issuer=self._issuer, audience=self.audience, memo_size=_MEMO_SIZE
        )

    async def aclose(self) -> None:
        self._verifier = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def is_open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(self.open_prefixes)

    async def verify(self, authorization: str | None) -> Principal:
        """The caller behind an ``Authorization`` header, or a 401 problem (503 when auth's
        keys cannot be fetched)."""
        if self._verifier is None:
            raise ServiceUnavailable("the service is not started", code="not_ready")
        return await self._verifier.verify(bearer_token(authorization))


class ServiceTokenMiddleware:
    """Refuse every request but the open paths unless it carries a valid service token; the
    caller is then left in the request's state for ``caller(scope)``."""

    def __init__(self, app: ASGIApp, verifier: CallerVerifier) -> None:
        self.app = app
        self.verifier = verifier

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.verifier.is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        try:
            principal = await self.verifier.verify(authorization)
        except ProblemError as exc:
            response = problem_response(
                Request(scope),
                exc.status,
                exc.code,
                exc.detail,
                headers=exc.headers,
                extra=exc.extra,
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})[_CALLER_STATE] = principal
        await self.app(scope, receive, send)


class _ServiceTokenScheme(SecurityBase):
    """The caller ``ServiceTokenMiddleware`` verified; in the OpenAPI document, the bearer
    scheme ``ServiceToken`` with each route's scope."""

    def __init__(self) -> None:
        self.model = HTTPBearerModel(
            bearerFormat="JWT",
            description="A service token: auth's client-credentials grant with "
            "audience=crossmodal:<service> (docs/security.md).",
        )
        self.scheme_name = "ServiceToken"

    async def __call__(self, request: Request) -> Principal:
        principal = request.scope.get("state", {}).get(_CALLER_STATE)
        if not isinstance(principal, Principal):
            raise Unauthorized("a service token is required", code="missing_token")
        return principal


_SERVICE_TOKEN = _ServiceTokenScheme()


async def _require_scopes(
    security_scopes: SecurityScopes, principal: Annotated[Principal, Depends(_SERVICE_TOKEN)]
) -> Principal:
    principal.require(*security_scopes.scopes)
    return principal


def caller(scope: str) -> Any:
    """``dependencies=[caller("retrieval:write")]``: the route needs a service token with that
    scope (403 ``insufficient_scope`` without it)."""
    service = scope.partition(":")[0]
    if scope not in SERVICE_SCOPES.get(service, {}):
        raise ValueError(f"unknown service scope {scope!r}")
    return Security(_require_scopes, scopes=[scope])
