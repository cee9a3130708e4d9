"""The auth service's HTTP app: ``POST /token`` (OAuth2), ``POST /revoke`` (RFC 7009),
``GET /.well-known/jwks.json``, the revocation feed the gateways poll (``GET /revocations``) and
the admin endpoints (``/admin/...``, scope ``admin``). The work is in ``service.AuthService``."""

from __future__ import annotations

import base64
import binascii
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Literal
from urllib.parse import unquote_plus

import anyio
import anyio.to_thread
from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from services.auth import errors
from services.auth.admin_api import admin_router
from services.auth.errors import NO_STORE, TokenError
from services.auth.metrics import TOKEN_FAILURES, TOKENS_ISSUED
from services.auth.runtime import AuthRuntime, DatabaseRevocations, LocalKeySource, OwnKeys
from services.auth.runtime import get_runtime as _runtime
from services.auth.scopes import parse_scope, unknown_scopes
from services.auth.service import AuthService, TokenSet
from services.auth.service_clients import ServiceClients
from services.auth.settings import MAX_SECRET_LENGTH, AuthSettings
from shared.app import build_app
from shared.contracts.auth import RevocationEntry, RevocationFeed
from shared.oauth import (
    FORM_MEDIA_TYPE,
    MAX_NAME_LENGTH,
    MAX_TOKEN_LENGTH,
    REVOKE_REQUEST_DOC,
    SERVICE_TOKEN_REQUEST_DOC,
)
from shared.problems import ProblemError
from shared.service_auth import CallerVerifier, caller
from shared.tokens import TokenVerifier

log = logging.getLogger(__name__)

JWKS_CACHE = {"Cache-Control": "public, max-age=300"}


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["Bearer"] = "Bearer"
    expires_in: int
    scope: str
    refresh_token: str | None = None
    refresh_token_expires_in: int | None = None


async def _read_form(request: Request) -> dict[str, str]:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != FORM_MEDIA_TYPE:
        raise errors.invalid_request(f"the request body must be {FORM_MEDIA_TYPE}")
    form = await request.form()
    fields: dict[str, str] = {}
    for key, value in form.multi_items():
        if key in fields:  # RFC 6749 §3.2: parameters must not be repeated
            raise errors.invalid_request(f"parameter {key!r} is repeated")
        if not isinstance(value, str):
            raise errors.invalid_request("file uploads are not accepted")
        fields[key] = value
    return fields


def _required(fields: dict[str, str], name: str, max_length: int) -> str:
    value = fields.get(name)
    if not value:
        raise errors.invalid_request(f"parameter {name!r} is required")
    if len(value) > max_length:
        raise errors.invalid_request(f"parameter {name!r} is too long")
    return value


def _requested_scopes(fields: dict[str, str]) -> frozenset[str]:
    requested = parse_scope(fields.get("scope"))
    # Unknown names are refused before any argon2 work is spent on the request.
    unknown = unknown_scopes(requested)
    if unknown:
        raise errors.invalid_scope(unknown, "unknown scope(s)")
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
        raise errors.invalid_client("malformed HTTP Basic credentials", "invalid_client") from None
    client_id, colon, secret = decoded.partition(":")
    if not colon:
        raise errors.invalid_client("malformed HTTP Basic credentials", "invalid_client")
    return unquote_plus(client_id), unquote_plus(secret)


async def _password_grant(runtime: AuthRuntime, fields: dict[str, str]) -> TokenSet:
    username = _required(fields, "username", MAX_NAME_LENGTH)
    password = _required(fields, "password", MAX_SECRET_LENGTH)
    requested = _requested_scopes(fields)
    return await runtime.run_hashing(runtime.service.password_grant, username, password, requested)


async def _client_credentials_grant(
    runtime: AuthRuntime, fields: dict[str, str], authorization: str | None
) -> TokenSet:
    basic = _basic_credentials(authorization)
    if basic is not None:
        if "client_id" in fields or "client_secret" in fields:
            # RFC 6749 §2.3: one client authentication method per request.
            raise errors.invalid_request(
                "send client credentials with HTTP Basic or in the body, not both"
            )
        client_id, client_secret = basic
        if not client_id or not client_secret:
            raise errors.invalid_request("HTTP Basic credentials need a client id and a secret")
        if len(client_id) > MAX_NAME_LENGTH or len(client_secret) > MAX_SECRET_LENGTH:
            raise errors.invalid_request("client credentials are too long")
    else:
        client_id = _required(fields, "client_id", MAX_NAME_LENGTH)
        client_secret = _required(fields, "client_secret", MAX_SECRET_LENGTH)
    if "audience" in fields:  # a calling service's token for an internal service
        grant = runtime.service_clients.grant
        requested = parse_scope(fields.get("scope"))
        access = await runtime.run(grant, client_id, client_secret, fields["audience"], requested)
        return TokenSet(access)
    requested = _requested_scopes(fields)
    return await runtime.run_hashing(
        runtime.service.client_credentials_grant, client_id, client_secret, requested
    )


async def _refresh_grant(runtime: AuthRuntime, fields: dict[str, str]) -> TokenSet:
    token = _required(fields, "refresh_token", MAX_TOKEN_LENGTH)
    requested = _requested_scopes(fields)
    return await runtime.run(runtime.service.refresh_grant, token, requested)


def create_app(settings: AuthSettings | None = None) -> FastAPI:
    settings = settings or AuthSettings()
    own_keys = OwnKeys()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await anyio.to_thread.run_sync(AuthService.open, settings)
        own_keys.use(service.keys)
        app.state.auth = AuthRuntime(
            settings=settings,
            service=service,
            verifier=TokenVerifier(
                LocalKeySource(service.keys),
                issuer=settings.issuer,
                audience=settings.audience,
                revocations=DatabaseRevocations(service),
            ),
            service_clients=ServiceClients(settings, service.issuer),
            hash_limiter=anyio.CapacityLimiter(os.cpu_count() or 1),
        )
        log.info("auth ready; signing key %s", service.keys.ring().signing_key.kid)
        try:
            yield
        finally:
            app.state.auth = None
            own_keys.use(None)
            service.close()

    async def readiness(app: FastAPI) -> str | None:
        runtime: AuthRuntime | None = getattr(app.state, "auth", None)
        if runtime is None:
            return "the signing key and the database are not loaded yet"
        await anyio.to_thread.run_sync(runtime.service.ping)  # raises when unreachable
        return None

    app = build_app(
        "auth",
        lifespan=lifespan,
        readiness=readiness,
        description="Issues RS256 access tokens and rotating refresh tokens, publishes the JWKS "
        "and the revocation list, and administers principals and signing keys.",
        # The revocation feed is for the gateways (a service token); the token endpoints and
        # the JWKS are for everyone, the admin routes for an admin user's own token.
        callers=CallerVerifier(
            "auth",
            issuer=settings.issuer,
            keys=own_keys,
            open_paths=("/token", "/revoke", "/.well-known/jwks.json"),
            open_prefixes=("/admin/",),
        ),
    )

    @app.post(
        "/token",
        response_model=TokenResponse,
        response_model_exclude_none=True,
        openapi_extra=SERVICE_TOKEN_REQUEST_DOC,
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
            elif grant_type == "refresh_token":
                issued = await _refresh_grant(runtime, fields)
            elif not grant_type:
                raise errors.invalid_request("parameter 'grant_type' is required")
            else:
                raise errors.unsupported_grant_type()
        except TokenError as exc:
            TOKEN_FAILURES.labels(exc.reason).inc()
            # No names in the log: users type passwords into the user-name field often enough.
            log.info("token request refused: %s (%s)", exc.code, exc.reason)
            raise
        TOKENS_ISSUED.labels(grant_type).inc()
        access = issued.access
        log.info("issued a %s token to %s, jti %s", grant_type, access.subject, access.jti)
        body = TokenResponse(
            access_token=access.access_token, expires_in=access.expires_in, scope=access.scope
        )
        if issued.refresh is not None:
            body.refresh_token = issued.refresh.token
            body.refresh_token_expires_in = issued.refresh.expires_in
        return JSONResponse(body.model_dump(exclude_none=True), headers=NO_STORE)

    @app.post(
        "/revoke",
        status_code=200,
        openapi_extra=REVOKE_REQUEST_DOC,
        summary="Revoke a refresh token (with its family) or an access token (RFC 7009)",
    )
    async def revoke(request: Request) -> Response:
        runtime = _runtime(request)
        fields = await _read_form(request)
        token = _required(fields, "token", MAX_TOKEN_LENGTH)
        if await runtime.run(runtime.service.revoke_refresh_token, token):
            return Response(status_code=200, headers=NO_STORE)
        try:
            principal = await runtime.verifier.verify(token)
        except ProblemError:
            # RFC 7009 §2.2: an invalid, expired or already revoked token is not an error.
            return Response(status_code=200, headers=NO_STORE)
        await runtime.run(runtime.service.revoke_access_token, principal)
        return Response(status_code=200, headers=NO_STORE)

    @app.get("/.well-known/jwks.json", summary="The public keys that verify access tokens")
    async def jwks(request: Request) -> JSONResponse:
        runtime = _runtime(request)
        ring = await runtime.run(runtime.service.keys.ring)
        return JSONResponse(ring.jwks(), headers=JWKS_CACHE)

    @app.get(
        "/revocations",
        summary="Revoked tokens still within their lifetime (polled by the gateways)",
        dependencies=[caller("auth:revocations")],
    )
    async def revocations(
        request: Request,
        since: Annotated[
            float | None, Query(description="only entries recorded at or after this time")
        ] = None,
    ) -> JSONResponse:
        runtime = _runtime(request)
        now, entries = await runtime.run(runtime.service.revocation_feed, since)
        feed = RevocationFeed(
            now=now, revocations=[RevocationEntry(**entry.as_entry()) for entry in entries]
        )
        return JSONResponse(
            feed.model_dump(mode="json", exclude_none=True), headers={"Cache-Control": "no-store"}
        )

    app.include_router(admin_router)
    return app
