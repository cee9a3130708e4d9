"""The OAuth2 form bodies of the token and revocation endpoints, documented once: the auth service
serves them and the gateway forwards them unchanged, so both describe the same form."""

from __future__ import annotations

from typing import Any

FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"


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


TOKEN_REQUEST_DOC = _form_doc(
    {
        "grant_type": {
            "type": "string",
            "enum": ["password", "client_credentials", "refresh_token"],
        },
        "username": {"type": "string"},
        "password": {"type": "string", "format": "password"},
        "client_id": {"type": "string"},
        "client_secret": {"type": "string", "format": "password"},
        "refresh_token": {"type": "string", "format": "password"},
        "scope": {"type": "string", "description": "space-separated scopes"},
    },
    ["grant_type"],
)
REVOKE_REQUEST_DOC = _form_doc(
    {
        "token": {"type": "string", "format": "password"},
        "token_type_hint": {"type": "string", "enum": ["access_token", "refresh_token"]},
    },
    ["token"],
)
