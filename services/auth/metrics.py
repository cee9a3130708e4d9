"""Prometheus counters of the token endpoint (label values are bounded sets)."""

from __future__ import annotations

from prometheus_client import Counter

from services.auth.principals import AuthFailure

GRANT_TYPES = ("password", "client_credentials")
FAILURE_REASONS = (
    *(failure.value for failure in AuthFailure),
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

# Export every series from the start, so rate() and alerts see a 0 rather than no data.
for _grant in GRANT_TYPES:
    TOKENS_ISSUED.labels(_grant)
for _reason in FAILURE_REASONS:
    TOKEN_FAILURES.labels(_reason)
