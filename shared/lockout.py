"""Exponential back-off of failed logins, per account: the policy that the gateway (in Redis,
shared by its replicas) and the auth service (in its own memory) both apply.

An account's first ``free_failures`` failed logins cost nothing. Each further one locks the
account for ``base_seconds``, doubled with every failure, at most ``max_seconds``. While it is
locked, every login of the account is refused with a 429 before its password is looked at: the
refusal says nothing about the password and neither counts nor extends the lock. A successful
login clears the count, and so does ``forget_seconds`` without a failure once a lock has ended.

An attempt is counted as failed before its password is checked (and cleared or given back once
the outcome is known), so concurrent guesses cannot slip past the limit together.
"""

from __future__ import annotations

import math
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.problems import TooManyRequests

# No lock is longer than this, whatever the settings: someone who keeps failing the logins of an
# account delays its owner's next login by at most this long after their last failure.
MAX_LOCKOUT_SECONDS = 3600.0


class LoginBackoff(BaseModel):
    """The back-off of one account's failed logins (see the module)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    free_failures: int = Field(5, ge=1, le=100)
    base_seconds: float = Field(1.0, ge=0.1, le=60)
    max_seconds: float = Field(900.0, ge=1, le=MAX_LOCKOUT_SECONDS)
    forget_seconds: float = Field(3600.0, ge=60, le=7 * 86400)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.max_seconds < self.base_seconds:
            raise ValueError("max_seconds must be at least base_seconds")
        return self

    def lockout_seconds(self, failures: int) -> float:
        """How long the ``failures``-th failure in a row locks the account (0: not at all)."""
        beyond = failures - self.free_failures
        if beyond <= 0:
            return 0.0
        # The exponent is capped before the power: a long run of failures must not overflow.
        return min(self.base_seconds * 2.0 ** min(beyond - 1, 32), self.max_seconds)

    def steps(self) -> tuple[float, ...]:
        """The lock of each failure past the free ones, up to the first at ``max_seconds``
        (every later one is that long too)."""
        steps = [self.lockout_seconds(self.free_failures + 1)]
        while steps[-1] < self.max_seconds and len(steps) <= 32:
            steps.append(self.lockout_seconds(self.free_failures + len(steps) + 1))
        return tuple(steps)


def account_locked(
    retry_after: float, lockout_seconds: float, *, headers: dict[str, str] | None = None
) -> TooManyRequests:
    """The 429 of a login refused because its account is locked: the same body whether the
    gateway or the auth service refuses it."""
    seconds = max(1, math.ceil(retry_after))
    return TooManyRequests(
        f"too many failed logins for this account; retry in {seconds}s",
        code="rate_limited",
        headers={**(headers or {}), "Retry-After": str(seconds)},
        extra={"limit": "account", "lockout_seconds": lockout_seconds},
    )
