"""The admin API at the gateway: ``/admin/...`` routes (scope ``admin``) forwarded to the auth
service with the caller's token, which the auth service checks again itself. The bodies are the
auth service's own (shared/contracts/auth.py): validated at the door and in the OpenAPI
document."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from services.gateway.openapi import SECURED, links, problems
from services.gateway.security import require
from shared.contracts.auth import (
    AuthClient,
    KeyList,
    PrincipalCreate,
    PrincipalCreated,
    PrincipalList,
    PrincipalOut,
    PrincipalUpdate,
    RevocationOut,
    RotationOut,
    TokenRevocation,
)
from shared.tokens import Principal

Admin = Annotated[Principal, require("admin")]
router = APIRouter(prefix="/admin", tags=["admin"])
# Admin answers are never cached by anyone on the way.
_NO_STORE = {"Cache-Control": "no-store"}


async def _auth(request: Request) -> AuthClient:
    return AuthClient(request.app.state.gateway.backends.auth)


Auth = Annotated[AuthClient, Depends(_auth)]


def _token(request: Request, response: Response) -> str:
    """The admin's own Authorization header, forwarded: the auth service checks it again."""
    response.headers.update(_NO_STORE)
    return request.headers["authorization"]


Token = Annotated[str, Depends(_token)]


@router.get(
    "/principals",
    response_model=PrincipalList,
    responses=problems(*SECURED),
    summary="List principals. Scope admin.",
)
async def list_principals(_: Admin, auth: Auth, token: Token) -> PrincipalList:
    return await auth.principals(token)


@router.post(
    "/principals",
    status_code=201,
    response_model=PrincipalCreated,
    response_model_exclude_none=True,
    responses={
        201: {
            "description": "The principal, and its secret when generated",
            "links": links(
                "name",
                "/principal/name",
                ("get", "/admin/principals/{name}"),
                ("patch", "/admin/principals/{name}"),
                ("post", "/admin/principals/{name}/revoke-tokens"),
            ),
        }
    }
    | problems(*SECURED, 409),
    summary="Create a user or an API client. Scope admin.",
)
async def create_principal(
    body: PrincipalCreate, _: Admin, auth: Auth, token: Token
) -> PrincipalCreated:
    return await auth.create_principal(token, body)


@router.get(
    "/principals/{name}",
    response_model=PrincipalOut,
    responses=problems(*SECURED, 404),
    summary="One principal. Scope admin.",
)
async def get_principal(name: str, _: Admin, auth: Auth, token: Token) -> PrincipalOut:
    return await auth.principal(token, name)


@router.patch(
    "/principals/{name}",
    response_model=PrincipalOut,
    responses=problems(*SECURED, 404),
    summary="Set scopes, disable or enable, or set a new secret. Disabling or a new secret "
    "revokes every token of the principal; removing scopes revokes its access tokens. "
    "Scope admin.",
)
async def update_principal(
    name: str, body: PrincipalUpdate, _: Admin, auth: Auth, token: Token
) -> PrincipalOut:
    return await auth.update_principal(token, name, body)


@router.post(
    "/principals/{name}/revoke-tokens",
    response_model=RevocationOut,
    response_model_exclude_none=True,
    responses=problems(*SECURED, 404),
    summary="Revoke every access and refresh token of a principal. Scope admin.",
)
async def revoke_principal_tokens(name: str, _: Admin, auth: Auth, token: Token) -> RevocationOut:
    return await auth.revoke_principal_tokens(token, name)


@router.post(
    "/revocations",
    status_code=201,
    response_model=RevocationOut,
    response_model_exclude_none=True,
    responses=problems(*SECURED),
    summary="Revoke one access token by its jti; refused by every gateway within seconds. "
    "Scope admin.",
)
async def revoke_token(body: TokenRevocation, _: Admin, auth: Auth, token: Token) -> RevocationOut:
    return await auth.revoke_token(token, body)


@router.get(
    "/keys",
    response_model=KeyList,
    responses=problems(*SECURED),
    summary="Signing keys and their state. Scope admin.",
)
async def list_keys(_: Admin, auth: Auth, token: Token) -> KeyList:
    return await auth.keys(token)


@router.post(
    "/keys/rotate",
    response_model=RotationOut,
    responses=problems(*SECURED, 409),
    summary="Sign new tokens with a new key; the previous key stays in the JWKS until its "
    "tokens have expired. Scope admin.",
)
async def rotate_key(_: Admin, auth: Auth, token: Token) -> RotationOut:
    return await auth.rotate_key(token)
