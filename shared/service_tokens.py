"""Service-to-service authentication, the caller's side: the tokens a service (the gateway,
``crossmodal reconcile``) sends to the internal services it calls.

``ServiceTokens`` holds one access token per called service, each from auth's client-credentials
grant with ``audience=crossmodal:<service>`` (``shared.service_auth`` says what each caller may
do there). A token is used until three quarters of its lifetime and refreshed then, in the
background, while requests go on with it; past nine tenths a request waits for the new one.
One fetch per service is in flight at a time, whatever the number of waiting requests, and a
failed refresh is not tried again for a second. ``credentials(service)`` is the
``httpx.Auth`` a ``ServiceClient`` adds it with (``ServiceClient(..., credentials=...)``).

A token a service refuses as invalid (401) is dropped and the request sent once more with a new
one; a refusal that persists, or a missing scope (403), is this deployment's fault, never the
user's: a 503 ``<service>_error`` naming the cause.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from urllib.parse import quote, urlencode

import httpx

from shared.http import ServiceClient, deadline_var, remaining_budget
from shared.problems import ProblemError, ServiceUnavailable
from shared.service_auth import OPEN_PATHS, audience

log = logging.getLogger(__name__)

FORM = "application/x-www-form-urlencoded"
# Fractions of a token's lifetime: refresh in the background from the first, wait from the second
# (what is left covers clock skew between the services and auth).
REFRESH_AT = 0.75
USABLE_UNTIL = 0.9
# After a failed background refresh, the next try waits this long (seconds).
RETRY_SECONDS = 1.0
_RETRY_AFTER = {"Retry-After": "1"}


@dataclass(frozen=True)
class _Token:
    value: str
    refresh_at: float
    usable_until: float


def _basic(client_id: str, secret: str) -> str:
    # RFC 6749 §2.3.1: each part form-encoded before the Basic encoding.
    pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


class ServiceTokens:
    """The service tokens of one caller (``client_id``), fetched through ``auth`` (a
    ``ServiceClient`` of the auth service that adds no token itself)."""

    def __init__(
        self,
        auth: ServiceClient,
        client_id: str,
        client_secret: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._auth = auth
        self.client_id = client_id
        self._authorization = _basic(client_id, client_secret)
        self._clock = clock
        self._tokens: dict[str, _Token] = {}
        self._fetching: dict[str, asyncio.Task[_Token]] = {}
        self._retry_at: dict[str, float] = {}

    def credentials(self, service: str) -> ServiceTokenAuth:
        """What ``ServiceClient(..., credentials=...)`` of ``service`` adds its token with."""
        return ServiceTokenAuth(self, service)

    async def token(self, service: str) -> str:
        """A token for ``service``: the one held, or a new one (fetched once for every caller
        waiting on it)."""
        held = self._tokens.get(service)
        now = self._clock()
        if held is not None and now < held.refresh_at:
            return held.value
        if held is not None and now < held.usable_until:
            if now >= self._retry_at.get(service, 0.0):
                self._fetch(service)  # in the background: this request goes on with the held one
            return held.value
        task = self._fetch(service)
        budget = remaining_budget()
        try:
            # shield: a request giving up (its deadline) must not cancel the fetch for the others.
            async with asyncio.timeout(None if budget is None else max(budget, 0.0)):
                return (await asyncio.shield(task)).value
        except TimeoutError:
            raise ServiceUnavailable(
                f"no {service} service token in time: the auth service is slow",
                code="auth_timeout",
                headers=_RETRY_AFTER,
            ) from None

    def invalidate(self, service: str, token: str) -> None:
        """Drop ``token`` (refused by ``service``) unless a newer one replaced it already."""
        held = self._tokens.get(service)
        if held is not None and held.value == token:
            del self._tokens[service]

    async def aclose(self) -> None:
        for task in list(self._fetching.values()):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self._fetching.clear()

    def _fetch(self, service: str) -> asyncio.Task[_Token]:
        task = self._fetching.get(service)
        if task is None:
            task = asyncio.create_task(self._fetched(service), name=f"service-token-{service}")
            self._fetching[service] = task
            task.add_done_callback(lambda done: self._done(service, done))
        return task

    def _done(self, service: str, task: asyncio.Task[_Token]) -> None:
        if self._fetching.get(service) is task:
            del self._fetching[service]
        if task.cancelled():
            return
        error = task.exception()  # retrieved here, so a background failure is never "unseen"
        if error is None:
            self._tokens[service] = task.result()
            self._retry_at.pop(service, None)
        else:
            self._retry_at[service] = self._clock() + RETRY_SECONDS
            log.warning("no %s service token for %s: %s", service, self.client_id, error)

    async def _fetched(self, service: str) -> _Token:
        # The fetch serves every request waiting on it: not bound by the deadline of the one
        # that happened to start it (the auth client's own timeouts bound it).
        deadline_var.set(None)
        started = self._clock()
        try:
            response = await self._auth.request(
                "POST",
                "/token",
                content=urlencode(
                    {"grant_type": "client_credentials", "audience": audience(service)}
                ),
                headers={"Authorization": self._authorization, "Content-Type": FORM},
                retry=True,
            )
        except ProblemError as exc:
            if exc.status >= 500:
                raise
            # Refused credentials or scope: this deployment's configuration, not the user's.
            raise ServiceUnavailable(
                f"the auth service refused the {self.client_id} client a {service} token: "
                f"{exc.detail} ({exc.code})",
                code="service_auth_failed",
                headers=_RETRY_AFTER,
            ) from None
        try:
            body = response.json()
            value, lifetime = body["access_token"], body["expires_in"]
            if not isinstance(value, str) or not isinstance(lifetime, int) or lifetime <= 0:
                raise TypeError("access_token or expires_in of the wrong type")
        except (ValueError, KeyError, TypeError) as exc:
            raise ServiceUnavailable(
                f"the auth service answered a token request outside the contract: {exc}",
                code="auth_error",
                headers=_RETRY_AFTER,
            ) from None
        return _Token(
            value,
            refresh_at=started + REFRESH_AT * lifetime,
            usable_until=started + USABLE_UNTIL * lifetime,
        )


class ServiceTokenAuth(httpx.Auth):
    """Adds the caller's token for ``service`` to each request that carries no Authorization
    of its own (a user's token forwarded stays as it is) and goes to neither a probe nor a
    scrape."""

    def __init__(self, tokens: ServiceTokens, service: str) -> None:
        self.tokens = tokens
        self.service = service

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if "authorization" in request.headers or request.url.path in OPEN_PATHS:
            yield request
            return
        token = await self.tokens.token(self.service)
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            # Refused before any work was done: safe to send again, with a new token.
            self.tokens.invalidate(self.service, token)
            token = await self.tokens.token(self.service)
            request.headers["Authorization"] = f"Bearer {token}"
            response = yield request
        if response.status_code in (401, 403):
            await response.aread()
            try:
                detail = response.json().get("detail", "")
            except (ValueError, AttributeError):
                detail = ""
            raise ServiceUnavailable(
                f"the {self.service} service refused the {self.tokens.client_id} service "
                f"token ({response.status_code}): {detail}",
                code=f"{self.service}_error",
                headers=_RETRY_AFTER,
            )
