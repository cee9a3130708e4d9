"""The services' own client-credentials grant: ``grant_type=client_credentials`` with
``audience=crossmodal:<service>`` issues a service token (shared/service_auth.py) to one of the
calling services of ``CALLERS``, authenticated by its client secret from the settings
(``AUTH_<CALLER>_CLIENT_SECRET``), with the scopes ``CALLERS`` gives it for that service and a
short lifetime (``AUTH_SERVICE_TOKEN_TTL_SECONDS``).

These clients are not principals of the database: no admin can create one or widen its scopes,
and a user token (audience ``crossmodal-gateway``) never opens an internal service.
"""

from __future__ import annotations

import hashlib
import hmac

from services.auth import errors
from services.auth.errors import TokenError
from services.auth.issuer import IssuedToken, TokenIssuer
from services.auth.settings import AuthSettings
from shared.service_auth import CALLERS, SERVICE_SCOPES, audience, service_of

# Compared against when the client id is unknown, so both answers take the same time.
_NO_SECRET = hashlib.sha256(b"no such client").digest()


def invalid_target(detail: str) -> TokenError:
    # RFC 8707 §2: the requested resource (here its audience) is unknown or not allowed.
    return TokenError(detail, code="invalid_target", status=400, reason="invalid_target")


class ServiceClients:
    def __init__(self, settings: AuthSettings, issuer: TokenIssuer) -> None:
        self._issuer = issuer
        self._ttl = settings.service_token_ttl_seconds
        self._digests = {
            caller: hashlib.sha256(secret.get_secret_value().encode()).digest()
            for caller, secret in settings.client_secrets().items()
        }

    def grant(
        self, client_id: str, secret: str, audience_value: str, requested: frozenset[str]
    ) -> IssuedToken:
        service = service_of(audience_value)
        if service is None:
            known = " ".join(audience(s) for s in SERVICE_SCOPES)
            raise invalid_target(f"unknown audience {audience_value!r}; known: {known}")
        given = hashlib.sha256(secret.encode()).digest()
        expected = self._digests.get(client_id)
        if not hmac.compare_digest(given, expected or _NO_SECRET) or expected is None:
            raise errors.invalid_client("invalid client credentials", "invalid_client")
        allowed = CALLERS[client_id].get(service, frozenset())
        if not allowed:
            raise invalid_target(f"the {client_id} client does not call the {service} service")
        if requested - allowed:
            raise errors.invalid_scope(requested - allowed, f"scope(s) not granted to {client_id}")
        return self._issuer.issue(
            client_id, requested or allowed, audience=audience_value, ttl_seconds=self._ttl
        )
