"""The admin API at the gateway: ``/admin/...`` routes (scope ``admin``) forwarded to the auth
service with the caller's token, which the auth service checks again itself. The bodies are
declared here for validation at the door and for the OpenAPI document."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from services.gateway.openapi import SECURED, problems
from services.gateway.security import require
from shared.tokens import Principal

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"
_SECRET = {"format": "password", "writeOnly": True}

Admin = Annotated[Principal, require("admin")]
router = APIRouter(prefix="/admin", tags=["admin"])


class PrincipalCreate(BaseModel):
    # Errors must never echo the input: it holds a secret.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["user", "client"] = "user"
    secret: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        json_schema_extra=_SECRET,
        description="Password or client secret (12+ characters); generated when omitted.",
    )
    scopes: list[str] = Field(default_factory=list, examples=[["search:text", "items:read"]])


class PrincipalUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    scopes: list[str] | None = None
    disabled: bool | None = None
    secret: str | None = Field(None, min_length=1, max_length=1024, json_schema_extra=_SECRET)


class TokenRevocation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jti: str = Field(min_length=1, max_length=64)
    expires_at: float | None = None


class PrincipalOut(BaseModel):
    name: str
    kind: Literal["user", "client"]
    scopes: list[str]
    disabled: bool
    created_at: str


class PrincipalList(BaseModel):
    principals: list[PrincipalOut]


class PrincipalCreated(BaseModel):
    principal: PrincipalOut
    secret: str | None = Field(None, description="The generated secret, shown only this once.")


class RevocationOut(BaseModel):
    kind: Literal["jti", "subject"]
    jti: str | None = None
    sub: str | None = None
    not_before: int | None = None
    expires_at: float


class KeyOut(BaseModel):
    kid: str
    created_at: float
    retired_at: float | None
    signing: bool
    published: bool
    published_until: float | None


class KeyList(BaseModel):
    keys: list[KeyOut]


class RotationOut(BaseModel):
    kid: str
    previous_kid: str
    previous_published_until: float


async def _forward(request: Request, method: str, path: str, body: Any = None) -> Response:
    state = request.app.state.gateway
    kwargs: dict[str, Any] = {"headers": {"Authorization": request.headers["authorization"]}}
    if body is not None:
        kwargs["json"] = body
    upstream = await state.backends.auth.request(method, path, **kwargs)
    return JSONResponse(
        upstream.json(), status_code=upstream.status_code, headers={"Cache-Control": "no-store"}
    )


@router.get(
    "/principals",
    response_model=PrincipalList,
    responses=problems(*SECURED),
    summary="List principals. Scope admin.",
)
async def list_principals(request: Request, _: Admin) -> Response:
    return await _forward(request, "GET", "/admin/principals")


@router.post(
    "/principals",
    status_code=201,
    response_model=PrincipalCreated,
    responses=problems(*SECURED, 409),
    summary="Create a user or an API client. Scope admin.",
)
async def create_principal(request: Request, body: PrincipalCreate, _: Admin) -> Response:
    return await _forward(request, "POST", "/admin/principals", body.model_dump(exclude_none=True))


@router.get(
    "/principals/{name}",
    response_model=PrincipalOut,
    responses=problems(*SECURED, 404),
    summary="One principal. Scope admin.",
)
async def get_principal(request: Request, name: str, _: Admin) -> Response:
    return await _forward(request, "GET", f"/admin/principals/{_path(name)}")


@router.patch(
    "/principals/{name}",
    response_model=PrincipalOut,
    responses=problems(*SECURED, 404),
    summary="Set scopes, disable or enable, or set a new secret. Disabling or a new secret "
    "revokes every token of the principal; removing scopes revokes its access tokens. "
    "Scope admin.",
)
async def update_principal(
    request: Request, name: str, body: PrincipalUpdate, _: Admin
) -> Response:
    return await _forward(
        request, "PATCH", f"/admin/principals/{_path(name)}", body.model_dump(exclude_unset=True)
    )


@router.post(
    "/principals/{name}/revoke-tokens",
    response_model=RevocationOut,
    responses=problems(*SECURED, 404),
    summary="Revoke every access and refresh token of a principal. Scope admin.",
)
async def revoke_principal_tokens(request: Request, name: str, _: Admin) -> Response:
    return await _forward(request, "POST", f"/admin/principals/{_path(name)}/revoke-tokens")


@router.post(
    "/revocations",
    status_code=201,
    response_model=RevocationOut,
    responses=problems(*SECURED),
    summary="Revoke one access token by its jti; refused by every gateway within seconds. "
    "Scope admin.",
)
async def revoke_token(request: Request, body: TokenRevocation, _: Admin) -> Response:
    return await _forward(request, "POST", "/admin/revocations", body.model_dump())


@router.get(
    "/keys",
    response_model=KeyList,
    responses=problems(*SECURED),
    summary="Signing keys and their state. Scope admin.",
)
async def list_keys(request: Request, _: Admin) -> Response:
    return await _forward(request, "GET", "/admin/keys")


@router.post(
    "/keys/rotate",
    response_model=RotationOut,
    responses=problems(*SECURED, 409),
    summary="Sign new tokens with a new key; the previous key stays in the JWKS until its "
    "tokens have expired. Scope admin.",
)
async def rotate_key(request: Request, _: Admin) -> Response:
    return await _forward(request, "POST", "/admin/keys/rotate")


def _path(name: str) -> str:
    # Names are restricted at creation; anything else cannot exist, but must not reach another
    # path of the auth service either.
    return quote(name, safe="")
