"""Who may call what, and how often: the dependencies every public route uses.

For a route with a scope, in this order: the client IP's rate limit (before any token work, so
a flood of bad tokens is throttled too), the token (signature, claims, revocation), the
revocation list's freshness, the scope, and the principal's rate limit for that scope. A token
already verified (``TokenVerifier.remembered``) needs no token work, so for it both rate limits
are taken in one Redis call after the checks, with the same outcome. The search routes take
that last charge in the same Redis round trip as their cache lookup (``admit``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request, Response, Security
from fastapi.security import OAuth2PasswordBearer, SecurityScopes
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.types import Scope

from services.gateway.ratelimit import Bucket, Charge
from services.gateway.settings import SCOPES, WRITE_SCOPES
from shared.oauth import FORM_MEDIA_TYPE
from shared.problems import ProblemError
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
    # uvicorn rewrites the client from X-Forwarded-For only for a peer in
    # GATEWAY_TRUSTED_PROXIES (shared.app.serve); else it is the TCP peer.
    return request.client.host if request.client else "unknown"


def _state(request: Request) -> GatewayState:
    return request.app.state.gateway


@dataclass(frozen=True)
class Admission:
    """A principal let in, with the rate-limit charge still to take (None: no bucket applies)."""

    principal: Principal
    charge: Charge | None


async def _admit(request: Request, scopes: list[str], token: str | None) -> Admission:
    state = _state(request)
    settings = state.settings
    write = any(scope in WRITE_SCOPES for scope in scopes)
    limiter = state.limiter
    ip: list[Bucket] = (
        [limiter.bucket("ip", client_ip(request), settings.ip_rate_limit)]
        if limiter is not None and settings.ip_rate_limit is not None
        else []
    )
    # A token the verifier remembers needs no token work: its checks come first, and then both
    # rate limits are charged in one Redis call, the IP's first, as two calls would. A token it
    # does not know is charged to the IP before any token work. Should a check refuse a token,
    # the IP limit is charged first all the same, so its 429 wins.
    try:
        # No header, another scheme than Bearer, or nothing after it: missing_token.
        raw = bearer_token(f"Bearer {token}" if token else None)
        principal = await state.verifier.remembered(raw)
        if principal is None:
            charged, ip = ip, []
            if limiter is not None and charged:
                await limiter.hit(charged, write=write)
            principal = await state.verifier.verify(raw)
        state.revocations.ensure_fresh(write=write)
        principal.require(*scopes)
    except ProblemError:
        if limiter is not None and ip:
            await limiter.hit(ip, write=write)
        raise
    if limiter is not None:
        buckets: list[Bucket] = [
            limiter.bucket("principal", f"{principal.subject}:{scope}", settings.rate_limits[scope])
            for scope in scopes
            if scope in settings.rate_limits
        ]
        return Admission(principal, limiter.charge(ip, buckets, write=write))
    return Admission(principal, None)


async def authorize(
    request: Request,
    security_scopes: SecurityScopes,
    token: Annotated[str | None, Depends(oauth2_scheme)],
) -> Principal:
    admission = await _admit(request, security_scopes.scopes, token)
    if admission.charge is not None:
        await admission.charge.take()
    return admission.principal


async def admit(
    request: Request,
    security_scopes: SecurityScopes,
    token: Annotated[str | None, Depends(oauth2_scheme)],
) -> Admission:
    admission = await _admit(request, security_scopes.scopes, token)
    # Found again by ``settle_admission`` once the request is answered.
    request.state.admission = admission
    return admission


async def settle_admission(scope: Scope) -> None:
    """Take the charge of an admission its route did not settle (the request was refused for
    its input before its Redis round trip); the answer already sent stands."""
    admission = scope.get("state", {}).get("admission")
    charge = admission.charge if isinstance(admission, Admission) else None
    if charge is not None and not charge.settled:
        with contextlib.suppress(ProblemError):
            await charge.take()


def require(scope: str) -> Any:
    """``Annotated[Principal, require("search:text")]``: the route needs that scope."""
    return Security(authorize, scopes=[scope])


def require_deferred(scope: str) -> Any:
    """``Annotated[Admission, require_deferred("search:text")]``: as ``require``, but the route
    takes ``Admission.charge`` itself, in a Redis round trip it makes anyway (for a path under
    ``/search/``, where ``BudgetMiddleware`` settles a charge left untaken)."""
    return Security(admit, scopes=[scope])


async def limit_token_requests(request: Request) -> None:
    """The per-IP limit of the token endpoints, where passwords can be guessed."""
    state = _state(request)
    limiter = state.limiter
    if limiter is not None and state.settings.token_rate_limit is not None:
        await limiter.hit(
            [limiter.bucket("token", client_ip(request), state.settings.token_rate_limit)],
            write=False,
        )


async def _token_form(request: Request) -> FormData | None:
    """A token request's form, read as the auth service reads it (the same parser); None when
    it is no form, which the auth service then refuses."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != FORM_MEDIA_TYPE:
        return None
    await request.body()  # kept by the request, for the forwarding after the parse
    try:
        return await request.form()
    except (HTTPException, MultiPartException):  # the auth service refuses it alike
        return None


async def refuse_service_audience(request: Request) -> None:
    """Service tokens (a client-credentials grant with an ``audience``) are issued by the auth
    service to the internal services only, never through the public door."""
    form = await _token_form(request)
    if form is not None and "audience" in form:
        raise ProblemError(
            "audience is not a field of this token endpoint",
            code="invalid_request",
            status=400,
            headers={"Cache-Control": "no-store"},
        )


async def _password_login(request: Request) -> str | None:
    """The account a token request logs in to with a password; None when it is no such
    request, which the auth service then refuses without looking at a password."""
    form = await _token_form(request)
    if form is None:
        return None
    username = form.get("username")
    if form.get("grant_type") != "password" or not isinstance(username, str) or not username:
        return None
    return username


async def limit_login(request: Request, forward: Callable[[], Awaitable[Response]]) -> Response:
    """``forward`` a token request, within the per-account limit of password logins
    (``RateLimiter.begin_login``): refused with a 429 while its account is locked; otherwise
    counted as a failure unless the auth service answers 200, or answers something other than
    401 (a malformed request, an error: given back)."""
    state = _state(request)
    limiter = state.limiter
    account = await _password_login(request) if limiter is not None else None
    attempt = None
    if limiter is not None and account is not None:
        attempt = await limiter.begin_login(account, state.settings.login_backoff)
    if attempt is None:
        return await forward()
    try:
        response = await forward()
    except Exception:
        await attempt.refund()
        raise
    if response.status_code == 200:
        await attempt.succeeded()
    elif response.status_code != 401:
        await attempt.refund()
    return response
