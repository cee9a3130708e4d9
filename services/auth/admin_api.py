"""Admin endpoints of the auth service (scope ``admin``): principals, revocations, signing keys.

The gateway forwards ``/admin/...`` here after its own checks; the auth service verifies the
admin's token again itself (its own keys and revocation list), so the endpoints are safe even
if something on the internal network calls them directly.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from services.auth.keystore import KeyInfo
from services.auth.principals import PrincipalKind, PrincipalRecord
from services.auth.revocations import Revocation
from services.auth.runtime import AuthRuntime, get_runtime
from services.auth.scopes import format_scopes, parse_scope
from services.auth.settings import MAX_SECRET_LENGTH, NAME_PATTERN
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
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Secret = Annotated[SecretStr, Field(min_length=1, max_length=MAX_SECRET_LENGTH)]

admin_router = APIRouter(prefix="/admin", tags=["admin"])


class PrincipalOut(BaseModel):
    name: str
    kind: Literal["user", "client"]
    scopes: list[str]
    disabled: bool
    created_at: datetime

    @classmethod
    def of(cls, record: PrincipalRecord) -> PrincipalOut:
        return cls(
            name=record.name,
            kind=record.kind.value,
            scopes=format_scopes(record.scopes).split(),
            disabled=record.disabled,
            created_at=record.created_at,
        )


class PrincipalList(BaseModel):
    principals: list[PrincipalOut]


class PrincipalCreate(BaseModel):
    # Errors must never echo the input: it holds a secret.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    name: Name
    kind: Literal["user", "client"] = "user"
    secret: Secret | None = Field(
        None, description="The password or client secret; generated and returned when omitted."
    )
    scopes: list[str] = Field(default_factory=list)


class PrincipalCreated(BaseModel):
    principal: PrincipalOut
    secret: str | None = Field(None, description="The generated secret, shown only this once.")


class PrincipalUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    scopes: list[str] | None = None
    disabled: bool | None = None
    secret: Secret | None = None


class RevocationOut(BaseModel):
    kind: Literal["jti", "subject"]
    jti: str | None = None
    sub: str | None = None
    not_before: int | None = None
    expires_at: float

    @classmethod
    def of(cls, revocation: Revocation) -> RevocationOut:
        return cls(kind=revocation.kind, **revocation.as_entry())  # type: ignore[arg-type]


class TokenRevocation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jti: str = Field(min_length=1, max_length=64)
    expires_at: float | None = Field(
        None, description="The token's exp, when known: the entry is dropped after it."
    )


class KeyOut(BaseModel):
    kid: str
    created_at: float
    retired_at: float | None
    signing: bool
    published: bool
    published_until: float | None

    @classmethod
    def of(cls, info: KeyInfo) -> KeyOut:
        return cls(**info.__dict__)


class KeyList(BaseModel):
    keys: list[KeyOut]


class RotationOut(BaseModel):
    kid: str
    previous_kid: str
    previous_published_until: float


@admin_router.get("/principals", response_model=PrincipalList, summary="List principals")
async def list_principals(runtime: Runtime, _: Admin) -> PrincipalList:
    records = await runtime.run(runtime.service.list_principals)
    return PrincipalList(principals=[PrincipalOut.of(r) for r in records])


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
    return PrincipalCreated(principal=PrincipalOut.of(record), secret=generated)


@admin_router.get("/principals/{name}", response_model=PrincipalOut, summary="One principal")
async def get_principal(name: str, runtime: Runtime, _: Admin) -> PrincipalOut:
    return PrincipalOut.of(await runtime.run(runtime.service.get_principal, name))


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
    return PrincipalOut.of(record)


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
    return RevocationOut.of(revocation)


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
    return RevocationOut.of(revocation)


@admin_router.get("/keys", response_model=KeyList, summary="Signing keys and their state")
async def list_keys(runtime: Runtime, _: Admin) -> KeyList:
    keys = await runtime.run(runtime.service.describe_keys)
    return KeyList(keys=[KeyOut.of(k) for k in keys])


@admin_router.post(
    "/keys/rotate",
    response_model=RotationOut,
    summary="Sign with a new key; the previous one stays published until its tokens expire",
)
async def rotate_key(runtime: Runtime, admin: Admin) -> RotationOut:
    rotation = await runtime.run(runtime.service.rotate_key, actor=admin.subject)
    return RotationOut(**rotation.__dict__)
