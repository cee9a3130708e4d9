"""Admin endpoints of the auth service (scope ``admin``): principals, revocations, signing keys.

The gateway forwards ``/admin/...`` here after its own checks; the auth service verifies the
admin's token again itself (its own keys and revocation list), so the endpoints are safe even
if something on the internal network calls them directly.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.auth.principals import PrincipalKind, PrincipalRecord
from services.auth.revocations import Revocation
from services.auth.runtime import AuthRuntime, get_runtime
from services.auth.scopes import format_scopes, parse_scope
from shared.contracts.auth import (
    KeyList,
    KeyOut,
    PrincipalCreate,
    PrincipalCreated,
    PrincipalList,
    PrincipalOut,
    PrincipalUpdate,
    RevocationOut,
    RotationOut,
    TokenRevocation,
)
from shared.tokens import Principal, bearer_token

_bearer = HTTPBearer(auto_error=False, description="An access token with the admin scope")


async def _admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    header = f"{credentials.scheme} {credentials.credentials}" if credentials else None
    principal = await get_runtime(request).verifier.verify(bearer_token(header))
    principal.require("admin")
    return principal


Admin = Annotated[Principal, Depends(_admin)]
Runtime = Annotated[AuthRuntime, Depends(get_runtime)]

admin_router = APIRouter(prefix="/admin", tags=["admin"])


def _principal_out(record: PrincipalRecord) -> PrincipalOut:
    return PrincipalOut(
        name=record.name,
        kind=record.kind.value,
        scopes=format_scopes(record.scopes).split(),
        disabled=record.disabled,
        created_at=record.created_at,
    )


def _revocation_out(revocation: Revocation) -> RevocationOut:
    return RevocationOut(kind=revocation.kind, **revocation.as_entry())  # type: ignore[arg-type]


@admin_router.get("/principals", response_model=PrincipalList, summary="List principals")
async def list_principals(runtime: Runtime, _: Admin) -> PrincipalList:
    records = await runtime.run(runtime.service.list_principals)
    return PrincipalList(principals=[_principal_out(r) for r in records])


@admin_router.post(
    "/principals",
    status_code=201,
    response_model=PrincipalCreated,
    response_model_exclude_none=True,
    summary="Create a user or an API client",
)
async def create_principal(
    body: PrincipalCreate, runtime: Runtime, admin: Admin
) -> PrincipalCreated:
    record, generated = await runtime.run(
        runtime.service.create_principal,
        body.name,
        PrincipalKind(body.kind),
        body.secret.get_secret_value() if body.secret else None,
        body.scopes,
        actor=admin.subject,
    )
    return PrincipalCreated(principal=_principal_out(record), secret=generated)


@admin_router.get("/principals/{name}", response_model=PrincipalOut, summary="One principal")
async def get_principal(name: str, runtime: Runtime, _: Admin) -> PrincipalOut:
    return _principal_out(await runtime.run(runtime.service.get_principal, name))


@admin_router.patch(
    "/principals/{name}",
    response_model=PrincipalOut,
    summary="Set scopes, disable or enable, or set a new secret",
)
async def update_principal(
    name: str, body: PrincipalUpdate, runtime: Runtime, admin: Admin
) -> PrincipalOut:
    record = await runtime.run(
        runtime.service.update_principal,
        name,
        scopes=None if body.scopes is None else parse_scope(" ".join(body.scopes)),
        disabled=body.disabled,
        secret=body.secret.get_secret_value() if body.secret else None,
        actor=admin.subject,
    )
    return _principal_out(record)


@admin_router.post(
    "/principals/{name}/revoke-tokens",
    response_model=RevocationOut,
    response_model_exclude_none=True,
    summary="Revoke every access and refresh token of a principal",
)
async def revoke_principal_tokens(name: str, runtime: Runtime, admin: Admin) -> RevocationOut:
    revocation = await runtime.run(
        runtime.service.revoke_principal_tokens, name, actor=admin.subject
    )
    return _revocation_out(revocation)


@admin_router.post(
    "/revocations",
    status_code=201,
    response_model=RevocationOut,
    response_model_exclude_none=True,
    summary="Revoke one access token by its jti",
)
async def revoke_token(body: TokenRevocation, runtime: Runtime, admin: Admin) -> RevocationOut:
    revocation = await runtime.run(
        runtime.service.revoke_token_id, body.jti, body.expires_at, actor=admin.subject
    )
    return _revocation_out(revocation)


@admin_router.get("/keys", response_model=KeyList, summary="Signing keys and their state")
async def list_keys(runtime: Runtime, _: Admin) -> KeyList:
    keys = await runtime.run(runtime.service.describe_keys)
    return KeyList(keys=[KeyOut(**k.__dict__) for k in keys])


@admin_router.post(
    "/keys/rotate",
    response_model=RotationOut,
    summary="Sign with a new key; the previous one stays published until its tokens expire",
)
async def rotate_key(runtime: Runtime, admin: Admin) -> RotationOut:
    rotation = await runtime.run(runtime.service.rotate_key, actor=admin.subject)
    return RotationOut(**rotation.__dict__)
