"""The auth service's API as the gateway uses it: the revocation feed (services/auth/app.py) and
the admin API (services/auth/admin_api.py), bodies declared once for both sides, and the typed
client the gateway's revocation poller and ``/admin`` router use."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, SecretStr, StrictBool, StrictFloat

from shared.contracts.client import JSON_HEADERS, ServiceApi

# User names and client ids: printable, no spaces or colons (a colon would break HTTP Basic).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"
MAX_SECRET_LENGTH = 1024
# Secrets set through the admin API; the auth service checks the length itself, so a short one
# is refused with its own code (weak_secret), and the document says the same.
MIN_SECRET_LENGTH = 12
# The platform's scopes; the auth service refuses others with its own code (unknown_scope), and
# the document lists them.
SCOPES = ("search:text", "search:image", "items:read", "items:write", "admin")

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Secret = Annotated[
    SecretStr,
    Field(
        min_length=1,
        max_length=MAX_SECRET_LENGTH,
        json_schema_extra={"format": "password", "writeOnly": True, "minLength": MIN_SECRET_LENGTH},
    ),
]
Scopes = Annotated[
    list[str], Field(json_schema_extra={"items": {"type": "string", "enum": list(SCOPES)}})
]
PrincipalKind = Literal["user", "client"]


class PrincipalOut(BaseModel):
    name: str
    kind: PrincipalKind
    scopes: list[str]
    disabled: bool
    created_at: AwareDatetime


class PrincipalList(BaseModel):
    principals: list[PrincipalOut]


class PrincipalCreate(BaseModel):
    # Errors must never echo the input: it holds a secret.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    name: Name
    kind: PrincipalKind = "user"
    secret: Secret | None = Field(
        None,
        description="The password or client secret (12+ characters); generated and returned "
        "when omitted.",
    )
    scopes: Scopes = Field(default_factory=list, examples=[["search:text", "items:read"]])


class PrincipalCreated(BaseModel):
    principal: PrincipalOut
    secret: str | None = Field(None, description="The generated secret, shown only this once.")


class PrincipalUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    scopes: Scopes | None = None
    disabled: StrictBool | None = None
    secret: Secret | None = None


class RevocationOut(BaseModel):
    kind: Literal["jti", "subject"]
    jti: str | None = None
    sub: str | None = None
    not_before: int | None = None
    expires_at: float


class TokenRevocation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jti: str = Field(min_length=1, max_length=64)
    # Strict: JSON false or "1" is not a time.
    expires_at: StrictFloat | None = Field(
        None, description="The token's exp, when known: the entry is dropped after it."
    )


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


class RevocationEntry(BaseModel):
    """A revoked token id (``jti``) or a revoked subject's tokens issued before ``not_before``."""

    jti: str | None = None
    sub: str | None = None
    not_before: int | None = None
    expires_at: float


class RevocationFeed(BaseModel):
    now: float = Field(description="the auth service's clock: pass it as `since` next time")
    revocations: list[RevocationEntry]


def _wire(body: PrincipalCreate | PrincipalUpdate, **dump: Any) -> str:
    """The body as JSON with its secret in clear (pydantic masks ``SecretStr`` when dumping)."""
    data = body.model_dump(mode="json", **dump)
    if body.secret is not None:
        data["secret"] = body.secret.get_secret_value()
    return json.dumps(data)


def _segment(name: str) -> str:
    # Names are restricted at creation; anything else cannot exist, but must not reach another
    # path of the auth service either.
    return quote(name, safe="")


class AuthClient(ServiceApi):
    """The auth service's revocation feed and its ``/admin`` API. Admin calls carry the admin's
    own token (``authorization``, the header as received): the auth service checks it again
    itself. Admin writes are never retried; a lost answer is for the admin to look at."""

    async def revocation_feed(self, since: float | None, *, timeout: float) -> RevocationFeed:
        params = {} if since is None else {"since": since}
        response = await self.http.request("GET", "/revocations", params=params, timeout=timeout)
        return RevocationFeed.model_validate_json(response.content)

    async def _call(
        self, method: str, path: str, authorization: str, content: str | None = None
    ) -> bytes:
        headers = {"Authorization": authorization}
        if content is not None:
            headers |= JSON_HEADERS
        response = await self.http.request(
            method, f"/admin{path}", headers=headers, content=content, retry=method == "GET"
        )
        return response.content

    async def principals(self, authorization: str) -> PrincipalList:
        return PrincipalList.model_validate_json(
            await self._call("GET", "/principals", authorization)
        )

    async def create_principal(self, authorization: str, body: PrincipalCreate) -> PrincipalCreated:
        raw = await self._call("POST", "/principals", authorization, _wire(body, exclude_none=True))
        return PrincipalCreated.model_validate_json(raw)

    async def principal(self, authorization: str, name: str) -> PrincipalOut:
        return PrincipalOut.model_validate_json(
            await self._call("GET", f"/principals/{_segment(name)}", authorization)
        )

    async def update_principal(
        self, authorization: str, name: str, body: PrincipalUpdate
    ) -> PrincipalOut:
        raw = await self._call(
            "PATCH", f"/principals/{_segment(name)}", authorization, _wire(body, exclude_unset=True)
        )
        return PrincipalOut.model_validate_json(raw)

    async def revoke_principal_tokens(self, authorization: str, name: str) -> RevocationOut:
        raw = await self._call("POST", f"/principals/{_segment(name)}/revoke-tokens", authorization)
        return RevocationOut.model_validate_json(raw)

    async def revoke_token(self, authorization: str, body: TokenRevocation) -> RevocationOut:
        raw = await self._call("POST", "/revocations", authorization, body.model_dump_json())
        return RevocationOut.model_validate_json(raw)

    async def keys(self, authorization: str) -> KeyList:
        return KeyList.model_validate_json(await self._call("GET", "/keys", authorization))

    async def rotate_key(self, authorization: str) -> RotationOut:
        return RotationOut.model_validate_json(
            await self._call("POST", "/keys/rotate", authorization)
        )
