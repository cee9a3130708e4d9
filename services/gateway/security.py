"""Who may call what, and how often: the dependencies every public route uses.

For a route with a scope, in this order: the client IP's rate limit (before any token work, so
a flood of bad tokens is throttled too), the token (signature, claims, revocation), the
revocation list's freshness, the scope, and the principal's rate limit for that scope.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import OAuth2PasswordBearer, SecurityScopes

from services.gateway.ratelimit import Bucket
from services.gateway.settings import SCOPES, WRITE_SCOPES
from shared.tokens import Principal, bearer_token

if TYPE_CHECKING:
    from services.gateway.app import GatewayState

# The security scheme of the OpenAPI document (each route's scopes) and the bearer token itself:
# None when the header is absent or not "Bearer …".
oauth2_scheme = OAuth2PasswordBearer(
    tokenUrl="/auth/token",
    scopes=SCOPES,
    auto_error=False,
    scheme_name="OAuth2",
    description="A bearer access token from POST /auth/token (password or client_credentials).",
)


def client_ip(request: Request) -> str:
    # uvicorn rewrites the client from X-Forwarded-For only for proxies in FORWARDED_ALLOW_IPS.
    return request.client.host if request.client else "unknown"


def _state(request: Request) -> GatewayState:
    return request.app.state.gateway


async def authorize(
    request: Request,
    security_scopes: SecurityScopes,
    token: Annotated[str | None, Depends(oauth2_scheme)],
) -> Principal:
    state = _state(request)
    settings = state.settings
    scopes = security_scopes.scopes
    write = any(scope in WRITE_SCOPES for scope in scopes)
    limiter = state.limiter
    if limiter is not None and settings.ip_rate_limit is not None:
        await limiter.hit(
            [limiter.bucket("ip", client_ip(request), settings.ip_rate_limit)], write=write
        )
    # No header, another scheme than Bearer, or nothing after it: missing_token.
    principal = await state.verifier.verify(bearer_token(f"Bearer {token}" if token else None))
    state.revocations.ensure_fresh(write=write)
    principal.require(*scopes)
    if limiter is not None:
        buckets: list[Bucket] = [
            limiter.bucket("principal", f"{principal.subject}:{scope}", settings.rate_limits[scope])
            for scope in scopes
            if scope in settings.rate_limits
        ]
        await limiter.hit(buckets, write=write)
    return principal


def require(scope: str) -> Any:
    """``Annotated[Principal, require("search:text")]``: the route needs that scope."""
    return Security(authorize, scopes=[scope])


async def limit_token_requests(request: Request) -> None:
    """The per-IP limit of the token endpoints, where passwords can be guessed."""
    state = _state(request)
    limiter = state.limiter
    if limiter is not None and state.settings.token_rate_limit is not None:
        await limiter.hit(
            [limiter.bucket("token", client_ip(request), state.settings.token_rate_limit)],
            write=False,
        )
