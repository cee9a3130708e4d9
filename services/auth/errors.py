"""The auth service's problems: OAuth2 token-endpoint errors (RFC 6749 §5.2) and admin errors,
all ``shared.problems.ProblemError``s."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from services.auth.principals import AuthFailure
from shared import lockout
from shared.problems import Conflict, NotFound, ProblemError, Unprocessable

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1


class TokenError(ProblemError):
    """A refused token request; ``reason`` labels the failure metric."""

    def __init__(
        self,
        detail: str,
        *,
        code: str,
        status: int,
        reason: str,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            detail,
            code=code,
            status=status,
            headers={**NO_STORE, **(headers or {})},
            extra=extra,
        )
        self.reason = reason


def invalid_request(detail: str) -> TokenError:
    return TokenError(detail, code="invalid_request", status=400, reason="invalid_request")


def invalid_grant(failure: AuthFailure) -> TokenError:
    # One answer for every cause, a disabled account included (telling it apart would confirm
    # its password): the reason is in the metric and the log only.
    return TokenError(
        "invalid username or password",
        code="invalid_grant",
        status=401,
        reason=failure.value,
        headers={"WWW-Authenticate": 'Bearer realm="crossmodal"'},
    )


def account_locked(retry_after: float, lockout_seconds: float) -> TokenError:
    problem = lockout.account_locked(retry_after, lockout_seconds)
    return TokenError(
        problem.detail,
        code=problem.code,
        status=problem.status,
        reason="account_locked",
        headers=problem.headers,
        extra=problem.extra,
    )


def invalid_refresh(reason: str) -> TokenError:
    # One message for every cause: the reason is in the metric and the log, not the answer.
    return TokenError(
        "the refresh token is invalid, expired or revoked",
        code="invalid_grant",
        status=401,
        reason=reason,
        headers={"WWW-Authenticate": 'Bearer realm="crossmodal"'},
    )


def invalid_client(detail: str, reason: str) -> TokenError:
    # RFC 6749 §5.2: 401 with a challenge for the scheme clients authenticate with.
    return TokenError(
        detail,
        code="invalid_client",
        status=401,
        reason=reason,
        headers={"WWW-Authenticate": 'Basic realm="crossmodal"'},
    )


def invalid_scope(scopes: Iterable[str], why: str) -> TokenError:
    return TokenError(
        f"{why}: {' '.join(sorted(scopes))}",
        code="invalid_scope",
        status=400,
        reason="invalid_scope",
    )


def unsupported_grant_type() -> TokenError:
    return TokenError(
        "supported grant types: password, client_credentials, refresh_token",
        code="unsupported_grant_type",
        status=400,
        reason="unsupported_grant_type",
    )


def principal_not_found(name: str) -> NotFound:
    return NotFound(f"no principal named {name!r}", code="principal_not_found")


def principal_exists(name: str) -> Conflict:
    return Conflict(f"a principal named {name!r} exists already", code="principal_exists")


def unknown_scope(scopes: Iterable[str]) -> Unprocessable:
    return Unprocessable(f"unknown scope(s): {' '.join(sorted(scopes))}", code="unknown_scope")


def weak_secret(minimum: int) -> Unprocessable:
    return Unprocessable(f"secrets must be at least {minimum} characters", code="weak_secret")


def key_rotation_failed(detail: str) -> Conflict:
    return Conflict(detail, code="key_rotation_failed")
