"""Prometheus counters of the token endpoint (label values are bounded sets)."""

from __future__ import annotations

from prometheus_client import Counter

from services.auth.principals import AuthFailure
from services.auth.refresh import RefreshFailure

GRANT_TYPES = ("password", "client_credentials", "refresh_token")
FAILURE_REASONS = (
    *(failure.value for failure in AuthFailure),
    *(failure.value for failure in RefreshFailure),
    "account_locked",
    "invalid_client",
    "invalid_request",
    "invalid_scope",
    "unsupported_grant_type",
)

TOKENS_ISSUED = Counter(
    "auth_tokens_issued_total", "Access tokens issued, by grant type.", ["grant_type"]
)
TOKEN_FAILURES = Counter(
    "auth_token_failures_total", "Token requests refused, by reason.", ["reason"]
)

REVOCATIONS = Counter(
    "auth_revocations_total",
    "Revocations recorded, by kind (an access token, every token of a subject, a refresh "
    "token family).",
    ["kind"],
)
KEY_ROTATIONS = Counter("auth_key_rotations_total", "Signing-key rotations done by this process.")

# Export every series from the start, so rate() and alerts see a 0 rather than no data.
for _grant in GRANT_TYPES:
    TOKENS_ISSUED.labels(_grant)
for _reason in FAILURE_REASONS:
    TOKEN_FAILURES.labels(_reason)
for _kind in ("jti", "subject", "refresh_family"):
    REVOCATIONS.labels(_kind)
