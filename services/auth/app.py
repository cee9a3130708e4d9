"""The auth service's HTTP app: ``POST /token`` (OAuth2) and ``GET /.well-known/jwks.json``."""

from __future__ import annotations

import base64
import binascii
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote_plus

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import Engine

from services.auth.issuer import IssuedToken, TokenIssuer
from services.auth.keys import KeyRing, SigningKey, load_or_create_private_key
from services.auth.metrics import TOKEN_FAILURES, TOKENS_ISSUED
from services.auth.principals import (
    AuthFailure,
    PrincipalKind,
    PrincipalRecord,
    PrincipalStore,
    create_db_engine,
    make_hasher,
)
from services.auth.scopes import ScopeError, grant_scopes, parse_scope, unknown_scopes
from services.auth.settings import MAX_SECRET_LENGTH, AuthSettings
from shared.app import build_app
from shared.problems import ProblemError, ServiceUnavailable

log = logging.getLogger(__name__)

FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"
MAX_NAME_LENGTH = 128
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1
JWKS_CACHE = {"Cache-Control": "public, max-age=300"}


@dataclass
class AuthRuntime:
    """Everything the lifespan builds and the routes use."""

    settings: AuthSettings
    engine: Engine
    keys: KeyRing
    store: PrincipalStore
    issuer: TokenIssuer
    # argon2 is CPU- and memory-heavy: bound the hashes running at once so a burst of logins
    # queues instead of exhausting memory (64 MiB each by default) or every core.
    hash_limiter: anyio.CapacityLimiter

    async def authenticate(
        self, name: str, secret: str, kind: PrincipalKind
    ) -> PrincipalRecord | AuthFailure:
        return await anyio.to_thread.run_sync(
            self.store.authenticate, name, secret, kind, limiter=self.hash_limiter
        )


def _start(settings: AuthSettings) -> tuple[Engine, KeyRing, PrincipalStore]:
    """The blocking part of startup (key file, key generation, schema, argon2): in a thread."""
    # The key comes first: a production start without one fails before any other work.
    private_key = load_or_create_private_key(
        settings.private_key_path, create=not settings.is_production
    )
    keys = KeyRing([SigningKey.from_private_key(private_key)])
    engine = create_db_engine(settings.database_url)
    try:
        hasher = make_hasher(
            time_cost=settings.argon2_time_cost, memory_kib=settings.argon2_memory_kib
        )
        store = PrincipalStore(engine, hasher)
        store.create_schema()
        for user in settings.bootstrap_users:
            if store.create_if_absent(
                user.username, PrincipalKind.USER, user.password.get_secret_value(), user.scopes
            ):
                log.info(
                    "created bootstrap user %s (scopes: %s)", user.username, " ".join(user.scopes)
                )
        for client in settings.bootstrap_clients:
            if store.create_if_absent(
                client.client_id,
                PrincipalKind.CLIENT,
                client.client_secret.get_secret_value(),
                client.scopes,
            ):
                log.info(
                    "created bootstrap client %s (scopes: %s)",
                    client.client_id,
                    " ".join(client.scopes),
                )
    except BaseException:
        engine.dispose()
        raise
    return engine, keys, store


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["Bearer"] = "Bearer"
    expires_in: int
    scope: str


class TokenError(ProblemError):
    """A refused token request; ``reason`` labels the failure metric."""

    def __init__(
        self,
        detail: str,
        *,
        code: str,
        status: int,
        reason: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail, code=code, status=status, headers={**NO_STORE, **(headers or {})})
        self.reason = reason


def _invalid_request(detail: str) -> TokenError:
    return TokenError(detail, code="invalid_request", status=400, reason="invalid_request")


def _invalid_grant(failure: AuthFailure) -> TokenError:
    detail = (
        "this account is disabled"
        if failure is AuthFailure.DISABLED
        else "invalid username or password"
    )
    return TokenError(
        detail,
        code="invalid_grant",
        status=401,
        reason=failure.value,
        headers={"WWW-Authenticate": 'Bearer realm="crossmodal"'},
    )


def _invalid_client(detail: str, reason: str) -> TokenError:
    # RFC 6749 §5.2: 401 with a challenge for the scheme clients authenticate with.
    return TokenError(
        detail,
        code="invalid_client",
        status=401,
        reason=reason,
        headers={"WWW-Authenticate": 'Basic realm="crossmodal"'},
    )


def _invalid_scope(scopes: frozenset[str] | tuple[str, ...], why: str) -> TokenError:
    return TokenError(
        f"{why}: {' '.join(sorted(scopes))}",
        code="invalid_scope",
        status=400,
        reason="invalid_scope",
    )


async def _read_form(request: Request) -> dict[str, str]:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != FORM_MEDIA_TYPE:
        raise _invalid_request(f"the request body must be {FORM_MEDIA_TYPE}")
    form = await request.form()
    fields: dict[str, str] = {}
    for key, value in form.multi_items():
        if key in fields:  # RFC 6749 §3.2: parameters must not be repeated
            raise _invalid_request(f"parameter {key!r} is repeated")
        if not isinstance(value, str):
            raise _invalid_request("file uploads are not accepted")
        fields[key] = value
    return fields


def _required(fields: dict[str, str], name: str, max_length: int) -> str:
    value = fields.get(name)
    if not value:
        raise _invalid_request(f"parameter {name!r} is required")
    if len(value) > max_length:
        raise _invalid_request(f"parameter {name!r} is too long")
    return value


def _requested_scopes(fields: dict[str, str]) -> frozenset[str]:
    requested = parse_scope(fields.get("scope"))
    # Unknown names are refused before any argon2 work is spent on the request.
    unknown = unknown_scopes(requested)
    if unknown:
        raise _invalid_scope(unknown, "unknown scope(s)")
    return requested


def _basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """Client credentials from an HTTP Basic header (RFC 6749 §2.3.1: each part form-encoded);
    None when there is no Basic header."""
    if not authorization:
        return None
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise _invalid_client("malformed HTTP Basic credentials", "invalid_client") from None
    client_id, colon, secret = decoded.partition(":")
    if not colon:
        raise _invalid_client("malformed HTTP Basic credentials", "invalid_client")
    return unquote_plus(client_id), unquote_plus(secret)


def _scopes_for(principal: PrincipalRecord, requested: frozenset[str]) -> frozenset[str]:
    try:
        return grant_scopes(requested, principal.scopes)
    except ScopeError as exc:
        raise _invalid_scope(exc.scopes, "scope(s) not granted to this principal") from None


async def _password_grant(runtime: AuthRuntime, fields: dict[str, str]) -> IssuedToken:
    username = _required(fields, "username", MAX_NAME_LENGTH)
    password = _required(fields, "password", MAX_SECRET_LENGTH)
    requested = _requested_scopes(fields)
    outcome = await runtime.authenticate(username, password, PrincipalKind.USER)
    if isinstance(outcome, AuthFailure):
        raise _invalid_grant(outcome)
    return runtime.issuer.issue(outcome.name, _scopes_for(outcome, requested))


async def _client_credentials_grant(
    runtime: AuthRuntime, fields: dict[str, str], authorization: str | None
) -> IssuedToken:
    basic = _basic_credentials(authorization)
    if basic is not None:
        if "client_id" in fields or "client_secret" in fields:
            # RFC 6749 §2.3: one client authentication method per request.
            raise _invalid_request(
                "send client credentials with HTTP Basic or in the body, not both"
            )
        client_id, client_secret = basic
        if not client_id or not client_secret:
            raise _invalid_request("HTTP Basic credentials need a client id and a secret")
        if len(client_id) > MAX_NAME_LENGTH or len(client_secret) > MAX_SECRET_LENGTH:
            raise _invalid_request("client credentials are too long")
    else:
        client_id = _required(fields, "client_id", MAX_NAME_LENGTH)
        client_secret = _required(fields, "client_secret", MAX_SECRET_LENGTH)
    requested = _requested_scopes(fields)
    outcome = await runtime.authenticate(client_id, client_secret, PrincipalKind.CLIENT)
    if isinstance(outcome, AuthFailure):
        detail = (
            "this client is disabled"
            if outcome is AuthFailure.DISABLED
            else "invalid client credentials"
        )
        raise _invalid_client(detail, outcome.value)
    return runtime.issuer.issue(outcome.name, _scopes_for(outcome, requested))


def _runtime(request: Request) -> AuthRuntime:
    runtime: AuthRuntime | None = getattr(request.app.state, "auth", None)
    if runtime is None:
        raise ServiceUnavailable("the auth service is not started", code="not_ready")
    return runtime


_TOKEN_REQUEST_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            FORM_MEDIA_TYPE: {
                "schema": {
                    "type": "object",
                    "required": ["grant_type"],
                    "properties": {
                        "grant_type": {
                            "type": "string",
                            "enum": ["password", "client_credentials"],
                        },
                        "username": {"type": "string"},
                        "password": {"type": "string", "format": "password"},
                        "client_id": {"type": "string"},
                        "client_secret": {"type": "string", "format": "password"},
                        "scope": {"type": "string", "description": "space-separated scopes"},
                    },
                }
            }
        },
    }
}


def create_app(settings: AuthSettings | None = None) -> FastAPI:
    settings = settings or AuthSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine, keys, store = await anyio.to_thread.run_sync(_start, settings)
        app.state.auth = AuthRuntime(
            settings=settings,
            engine=engine,
            keys=keys,
            store=store,
            issuer=TokenIssuer(
                keys,
                issuer=settings.issuer,
                audience=settings.audience,
                ttl_seconds=settings.access_token_ttl_seconds,
            ),
            hash_limiter=anyio.CapacityLimiter(os.cpu_count() or 1),
        )
        log.info("auth ready; signing key %s", keys.signing_key.kid)
        try:
            yield
        finally:
            app.state.auth = None
            engine.dispose()

    async def readiness(app: FastAPI) -> str | None:
        runtime: AuthRuntime | None = getattr(app.state, "auth", None)
        if runtime is None:
            return "the signing key and the database are not loaded yet"
        await anyio.to_thread.run_sync(runtime.store.ping)  # raises when unreachable
        return None

    app = build_app(
        "auth",
        lifespan=lifespan,
        readiness=readiness,
        description="Issues RS256 access tokens (OAuth2 password and client credentials grants).",
    )

    @app.post(
        "/token",
        response_model=TokenResponse,
        openapi_extra=_TOKEN_REQUEST_DOC,
        summary="Issue an access token (OAuth2 token endpoint)",
    )
    async def token(request: Request) -> JSONResponse:
        runtime = _runtime(request)
        try:
            fields = await _read_form(request)
            grant_type = fields.get("grant_type", "")
            if grant_type == "password":
                issued = await _password_grant(runtime, fields)
            elif grant_type == "client_credentials":
                issued = await _client_credentials_grant(
                    runtime, fields, request.headers.get("authorization")
                )
            elif not grant_type:
                raise _invalid_request("parameter 'grant_type' is required")
            else:
                raise TokenError(
                    "supported grant types: password, client_credentials",
                    code="unsupported_grant_type",
                    status=400,
                    reason="unsupported_grant_type",
                )
        except TokenError as exc:
            TOKEN_FAILURES.labels(exc.reason).inc()
            # No names in the log: users type passwords into the user-name field often enough.
            log.info("token request refused: %s (%s)", exc.code, exc.reason)
            raise
        TOKENS_ISSUED.labels(grant_type).inc()
        log.info("issued a %s token to %s, jti %s", grant_type, issued.subject, issued.jti)
        body = TokenResponse(
            access_token=issued.access_token, expires_in=issued.expires_in, scope=issued.scope
        )
        return JSONResponse(body.model_dump(), headers=NO_STORE)

    @app.get("/.well-known/jwks.json", summary="The public keys that verify access tokens")
    async def jwks(request: Request) -> JSONResponse:
        return JSONResponse(_runtime(request).keys.jwks(), headers=JWKS_CACHE)

    return app
