"""The auth service's own count of failed logins per account (``shared.lockout``), in memory, so
that a caller who reaches ``POST /token`` without the gateway is limited too.

The memory is bounded: at most ``max_accounts`` accounts are followed. Past that, the account
that failed least recently among those with fewer than ``free_failures`` failures is forgotten
first; one with more is forgotten only when none else is left. So a spray of one guess at each of
many names cannot make the service forget an account under attack: that would take
``free_failures`` guesses at each of ``max_accounts`` names.
Each replica counts for itself; the gateway's count in Redis is the one its replicas share.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from shared.lockout import LoginBackoff


@dataclass(frozen=True)
class _Account:
    failures: int = 0
    locked_until: float = 0.0
    lockout_seconds: float = 0.0
    forget_at: float = 0.0


@dataclass(frozen=True)
class LoginAttempt:
    """A login counted as failed before its password is checked; ``LoginLockout.succeeded`` or
    ``refund`` settles it once the outcome is known (a failure is settled already)."""

    account: str
    counted: _Account
    before: _Account


class AccountLocked(Exception):
    def __init__(self, retry_after: float, lockout_seconds: float) -> None:
        super().__init__(f"locked for {retry_after:.1f}s more")
        self.retry_after = retry_after
        self.lockout_seconds = lockout_seconds


class LoginLockout:
    def __init__(
        self,
        policy: LoginBackoff,
        *,
        max_accounts: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.max_accounts = max_accounts
        self._clock = clock
        self._lock = threading.Lock()  # the grants run in worker threads
        # Least recently failed first in each.
        self._counting: OrderedDict[str, _Account] = OrderedDict()
        self._backing_off: OrderedDict[str, _Account] = OrderedDict()

    def __len__(self) -> int:
        return len(self._counting) + len(self._backing_off)

    def begin(self, account: str) -> LoginAttempt:
        """Count a login of ``account`` as failed, or raise ``AccountLocked`` while it is locked
        (without counting it)."""
        with self._lock:
            now = self._clock()
            before = self._get(account)
            if before is not None and now >= before.forget_at:
                self._pop(account)
                before = None
            if before is not None and now < before.locked_until:
                raise AccountLocked(before.locked_until - now, before.lockout_seconds)
            before = before or _Account()
            failures = before.failures + 1
            lockout = self.policy.lockout_seconds(failures)
            if lockout:
                counted = _Account(
                    failures=failures,
                    locked_until=now + lockout,
                    lockout_seconds=lockout,
                    forget_at=now + lockout + self.policy.forget_seconds,
                )
            else:
                counted = replace(
                    before, failures=failures, forget_at=now + self.policy.forget_seconds
                )
            self._put(account, counted)
            return LoginAttempt(account, counted, before)

    def succeeded(self, attempt: LoginAttempt) -> None:
        """The password was right: the account starts afresh."""
        with self._lock:
            self._pop(attempt.account)

    def refund(self, attempt: LoginAttempt) -> None:
        """The attempt never reached a verdict on the password (an error): give it back, unless
        another attempt of the account was counted since."""
        with self._lock:
            current = self._pop(attempt.account)
            if current is None:
                return
            if current == attempt.counted:
                current = attempt.before
            if current.failures:
                self._put(attempt.account, current)

    def _get(self, account: str) -> _Account | None:
        state = self._counting.get(account)
        return state if state is not None else self._backing_off.get(account)

    def _pop(self, account: str) -> _Account | None:
        state = self._counting.pop(account, None)
        return state if state is not None else self._backing_off.pop(account, None)

    def _put(self, account: str, state: _Account) -> None:
        """Store ``state`` as the most recent failure, forgetting the oldest beyond the bound."""
        self._pop(account)
        backing_off = state.failures >= self.policy.free_failures
        (self._backing_off if backing_off else self._counting)[account] = state
        while len(self) > self.max_accounts:
            (self._counting or self._backing_off).popitem(last=False)
