"""The OAuth2 form bodies of the token and revocation endpoints, documented once: the auth service
serves them and the gateway forwards them unchanged, so both describe the same form."""

from __future__ import annotations

from typing import Any

from shared.contracts.auth import MAX_SECRET_LENGTH, SCOPES

FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"
MAX_NAME_LENGTH = 128
MAX_TOKEN_LENGTH = 8192
# Space-separated known scopes (RFC 6749 §3.3); empty asks for every scope granted.
_SCOPE_PATTERN = "^(?:(?:" + "|".join(SCOPES) + ")(?: +|$))*$"


def _text(max_length: int, **extra: Any) -> dict[str, Any]:
    # An empty value is refused like a missing one.
    return {"type": "string", "minLength": 1, "maxLength": max_length, **extra}


def _form_doc(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                FORM_MEDIA_TYPE: {
                    "schema": {"type": "object", "required": required, "properties": properties}
                }
            },
        }
    }


_TOKEN_FIELDS: dict[str, Any] = {
    "grant_type": {
        "type": "string",
        "enum": ["password", "client_credentials", "refresh_token"],
    },
    "username": _text(MAX_NAME_LENGTH, description="with the password grant"),
    "password": _text(MAX_SECRET_LENGTH, format="password", description="with the password grant"),
    "client_id": _text(
        MAX_NAME_LENGTH,
        description="with the client_credentials grant, unless HTTP Basic carries it",
    ),
    "client_secret": _text(
        MAX_SECRET_LENGTH,
        format="password",
        description="with the client_credentials grant, unless HTTP Basic carries it",
    ),
    "refresh_token": _text(
        MAX_TOKEN_LENGTH, format="password", description="with the refresh_token grant"
    ),
    "scope": {
        "type": "string",
        "pattern": _SCOPE_PATTERN,
        "description": "space-separated scopes; none asks for every scope granted",
    },
}
# The public token endpoint (the gateway's /auth/token).
TOKEN_REQUEST_DOC = _form_doc(_TOKEN_FIELDS, ["grant_type"])
# The auth service's own /token also issues service tokens to the calling services
# (shared/service_auth.py): client_credentials with an internal audience. The gateway refuses
# the field, so service tokens are never issued through the public door.
SERVICE_TOKEN_REQUEST_DOC = _form_doc(
    {
        **_TOKEN_FIELDS,
        "audience": {
            "type": "string",
            "pattern": "^crossmodal:[a-z]+$",
            "description": "with the client_credentials grant of a calling service: the "
            "internal service the token is for (crossmodal:<service>); scope then names that "
            "service's scopes",
        },
        "scope": {"type": "string", "description": "space-separated scopes"},
    },
    ["grant_type"],
)
REVOKE_REQUEST_DOC = _form_doc(
    {
        "token": _text(MAX_TOKEN_LENGTH, format="password"),
        # RFC 7009 §2.1: only a hint; every token is looked up whatever it says.
        "token_type_hint": {
            "type": "string",
            "description": "access_token or refresh_token; a hint, which the lookup ignores",
        },
    },
    ["token"],
)
