"""HTTP client for calls between services: explicit timeouts, bounded retries for idempotent
requests, the request id and the trace context (``traceparent``, ``tracestate``) passed along, a
per-request deadline shared by every call of one request, an optional circuit breaker, and
upstream failures turned into problem errors.

A downstream service that is down or slow always ends as a 503 problem (``<service>_unavailable``,
``<service>_error`` or ``<service>_timeout``) with ``Retry-After``: the caller's request can be
retried later, and never hangs past its deadline.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, ClassVar

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from prometheus_client import Counter, Gauge

from shared.context import REQUEST_ID_HEADER, request_id_var
from shared.problems import ProblemError, ServiceUnavailable
from shared.tracing import outgoing_headers

log = logging.getLogger(__name__)

_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
_URL_MEMO_SIZE = 1024

CIRCUIT_STATE = Gauge(
    "multimodal_circuit_breaker_state",
    "Circuit breaker state per downstream target: 0 closed, 1 half-open, 2 open.",
    ["target"],
    # Each worker of several keeps its own breakers: the scrape shows the worst one.
    multiprocess_mode="livemax",
)
CIRCUIT_REJECTIONS = Counter(
    "multimodal_circuit_breaker_rejections_total",
    "Calls refused without trying because the target's circuit breaker was open.",
    ["target"],
)

# -- per-request deadline ---------------------------------------------------------------------

# Monotonic time by which the current request must be answered; None when unbounded.
deadline_var: ContextVar[float | None] = ContextVar("deadline", default=None)


@contextmanager
def request_deadline(seconds: float | None) -> Iterator[None]:
    """Bound every ServiceClient call made inside the block by one shared budget. A nested
    deadline can only shorten the budget, never extend it."""
    if seconds is None:
        yield
        return
    deadline = time.monotonic() + seconds
    outer = deadline_var.get()
    token = deadline_var.set(deadline if outer is None else min(outer, deadline))
    try:
        yield
    finally:
        deadline_var.reset(token)


def remaining_budget() -> float | None:
    """Seconds left before the current request's deadline; None when there is none."""
    deadline = deadline_var.get()
    return None if deadline is None else deadline - time.monotonic()


# -- circuit breaker --------------------------------------------------------------------------


class CircuitOpen(Exception):
    """A call was refused because the circuit is open; ``retry_after`` is in seconds."""

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(f"circuit {name} is open")
        self.retry_after = retry_after


class CircuitBreaker:
    """Consecutive-failure circuit breaker.

    Closed: calls go through; ``failure_threshold`` failures in a row open it. Open: calls are
    refused at once (``CircuitOpen``) for ``reset_seconds``. Then one probe call is let through
    (half-open): its success closes the circuit, its failure opens it again. Not thread-safe;
    meant for one event loop, where state changes happen between awaits.
    """

    CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
    _GAUGE: ClassVar[dict[str, int]] = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        reset_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or reset_seconds <= 0:
            raise ValueError("failure_threshold must be >= 1 and reset_seconds > 0")
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_seconds = reset_seconds
        self._clock = clock
        self._state = self.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        CIRCUIT_STATE.labels(name).set(0)

    @property
    def state(self) -> str:
        if self._state == self.OPEN and self._clock() - self._opened_at >= self.reset_seconds:
            return self.HALF_OPEN
        return self._state

    def _set(self, state: str) -> None:
        if state != self._state:
            log.warning("circuit %s: %s -> %s", self.name, self._state, state)
        self._state = state
        CIRCUIT_STATE.labels(self.name).set(self._GAUGE[state])

    def retry_after(self) -> float:
        if self._state == self.OPEN:
            return max(0.0, self.reset_seconds - (self._clock() - self._opened_at))
        return 0.0

    def allow(self) -> None:
        """Raise ``CircuitOpen`` unless a call may go out now. When the cool-down is over the
        caller becomes the single probe; it must then report ``success``, ``failure`` or
        ``abandon``."""
        if self._state == self.CLOSED:
            return
        if self._state == self.OPEN:
            if self._clock() - self._opened_at < self.reset_seconds:
                CIRCUIT_REJECTIONS.labels(self.name).inc()
                raise CircuitOpen(self.name, self.retry_after())
            self._set(self.HALF_OPEN)
        if self._probing:  # half-open and a probe is already out: the others wait outside
            CIRCUIT_REJECTIONS.labels(self.name).inc()
            raise CircuitOpen(self.name, 1.0)
        self._probing = True

    def success(self) -> None:
        self._probing = False
        self._failures = 0
        self._set(self.CLOSED)

    def failure(self) -> None:
        self._probing = False
        self._failures += 1
        if self._state == self.HALF_OPEN or self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
            self._set(self.OPEN)

    def abandon(self) -> None:
        """The call ended without a verdict (cancelled): let the next caller probe instead."""
        self._probing = False


# -- the transport ----------------------------------------------------------------------------


class AiohttpServiceTransport(AiohttpTransport):
    """httpx's API over aiohttp's connection pool and HTTP parser: a quarter of httpx's own
    client CPU per call between services (encode/httpx#3215; measured in docs/benchmarks.md).

    The adapter reports every broken connection (a peer that closed a pooled keep-alive
    connection, a reset) as ``httpx.ConnectTimeout``; here they are transport errors, which
    ``ServiceClient`` retries, while real timeouts stay timeouts, which it never retries."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except httpx.ConnectTimeout as exc:
            if isinstance(exc.__cause__, aiohttp.ClientConnectionError) and not isinstance(
                exc.__cause__, aiohttp.ServerTimeoutError
            ):
                raise httpx.ReadError(str(exc), request=request) from exc.__cause__
            raise


# -- the client -------------------------------------------------------------------------------


class _NoCookies(httpx.Cookies):
    """An always-empty jar: services never set cookies for each other, and httpx would otherwise
    wrap every answer in urllib request and response objects to look for some (about 5 % of the
    gateway's CPU per uncached search, measured with py-spy)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


_NO_COOKIES = _NoCookies()


class _CookielessClient(httpx.AsyncClient):
    @property  # type: ignore[override]
    def cookies(self) -> httpx.Cookies:
        return _NO_COOKIES


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class _Failed(Exception):
    """Transport-level failure of one call (after retries), carrying the problem to raise."""

    def __init__(self, problem: ProblemError) -> None:
        super().__init__(problem.detail)
        self.problem = problem


class ServiceClient:
    """One downstream service. ``request`` returns the response for 2xx and re-raises the
    downstream problem for 4xx, so a caller's mistake keeps its status and code end to end."""

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        timeout: float = 5.0,
        connect_timeout: float = 1.0,
        retries: int = 2,
        backoff: float = 0.1,
        breaker: CircuitBreaker | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        credentials: httpx.Auth | None = None,
    ) -> None:
        """``credentials`` adds an Authorization header to the requests that carry none
        (``shared.service_tokens``: the caller's service token)."""
        self.name = name
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.breaker = breaker
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)
        self._client = _CookielessClient(
            base_url=base_url,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=limits,
            transport=transport or AiohttpServiceTransport(limits=limits, trust_env=False),
            auth=credentials,
        )
        # Absolute URLs by path, built once: httpx would parse the path and join it to the base
        # URL on every call (about 4 % of the gateway's CPU per uncached search).
        self._urls: dict[str, httpx.URL] = {}

    async def aclose(self) -> None:
        await self._client.aclose()

    def _absolute(self, url: str) -> httpx.URL:
        absolute = self._urls.get(url)
        if absolute is None:
            if len(self._urls) >= _URL_MEMO_SIZE:  # paths name collections: keep it bounded
                self._urls.clear()
            base = self._client.base_url
            path = httpx.URL(url).raw_path.lstrip(b"/")
            absolute = self._urls[url] = base.copy_with(raw_path=base.raw_path + path)
        return absolute

    def _timed_out(self, why: str) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"the {self.name} service {why}", code=f"{self.name}_timeout", headers=_retry_after(1)
        )

    async def request(
        self,
        method: str,
        url: str,
        *,
        retry: bool | None = None,
        timeout: float | None = None,
        allow_client_errors: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send one request. ``retry`` defaults to True for idempotent methods only; a POST that
        is safe to repeat (a search, an embedding) passes ``retry=True``. ``timeout`` can only
        shorten the client's own. With ``allow_client_errors`` a 4xx answer is returned as is
        instead of raised (for proxying)."""
        headers = dict(kwargs.pop("headers", None) or {})
        request_id = request_id_var.get()
        if request_id:
            headers.setdefault(REQUEST_ID_HEADER, request_id)
        # The current span as the parent of the callee's: one trace across the services.
        outgoing_headers(headers)
        remaining = remaining_budget()
        if remaining is not None and remaining <= 0:
            raise self._timed_out("was not called: the request's time budget is spent")
        if self.breaker is not None:
            try:
                self.breaker.allow()
            except CircuitOpen as exc:
                raise ServiceUnavailable(
                    f"the {self.name} service is failing; calls are suspended for a moment",
                    code=f"{self.name}_unavailable",
                    headers=_retry_after(exc.retry_after),
                    extra={"circuit": "open"},
                ) from None
        verdict: bool | None = None
        try:
            response = await self._send(method, url, headers, retry, timeout, kwargs)
            verdict = response.status_code < 500
        except _Failed as exc:
            verdict = False
            raise exc.problem from exc.__cause__
        finally:
            if self.breaker is not None:
                if verdict is None:
                    self.breaker.abandon()
                elif verdict:
                    self.breaker.success()
                else:
                    self.breaker.failure()
        if not (allow_client_errors and response.status_code < 500):
            _raise_for_problem(self.name, response)
        return response

    async def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        retry: bool | None,
        timeout: float | None,
        kwargs: dict[str, Any],
    ) -> httpx.Response:
        may_retry = method.upper() in _IDEMPOTENT if retry is None else retry
        attempts = 1 + (self.retries if may_retry else 0)
        for attempt in range(attempts):
            limit = self.timeout if timeout is None else min(timeout, self.timeout)
            remaining = remaining_budget()
            if remaining is not None:
                if remaining <= 0:
                    raise _Failed(self._timed_out("did not answer within the request's budget"))
                limit = min(limit, remaining)
            try:
                # httpx's read timeout is per read; asyncio.timeout bounds the whole exchange,
                # so a server that trickles bytes cannot hold the request past its budget.
                async with asyncio.timeout(limit):
                    response = await self._client.request(
                        method,
                        self._absolute(url),
                        headers=headers,
                        timeout=httpx.Timeout(limit, connect=min(self.connect_timeout, limit)),
                        **kwargs,
                    )
            except (httpx.TimeoutException, TimeoutError) as exc:
                # A timed-out request may still be running: never pile a retry on top of it.
                raise _Failed(self._timed_out("did not answer in time")) from exc
            except httpx.TransportError as exc:
                if attempt + 1 < attempts and await self._backoff(attempt):
                    continue
                raise _Failed(
                    ServiceUnavailable(
                        f"the {self.name} service is unreachable",
                        code=f"{self.name}_unavailable",
                        headers=_retry_after(1),
                    )
                ) from exc
            if (
                response.status_code >= 500
                and attempt + 1 < attempts
                and await self._backoff(attempt)
            ):
                continue
            return response
        raise AssertionError("unreachable")

    async def _backoff(self, attempt: int) -> bool:
        """Sleep before a retry; False when the budget has no room for one."""
        delay = self.backoff * 2**attempt
        remaining = remaining_budget()
        if remaining is not None and remaining <= delay:
            return False
        await asyncio.sleep(delay)
        return True


# Extension members of a downstream problem that the caller needs as fields, not only in detail.
_FORWARDED_PROBLEM_FIELDS = frozenset({"errors", "pointer", "item_id", "item_status"})


def _raise_for_problem(service: str, response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    if response.status_code < 500:
        headers = {
            k: v for k, v in response.headers.items() if k.lower() in ("retry-after", "allow")
        }
        raise ProblemError(
            str(body.get("detail") or f"{service} rejected the request"),
            status=response.status_code,
            code=str(body.get("code") or "bad_request"),
            headers=headers,
            extra={k: v for k, v in body.items() if k in _FORWARDED_PROBLEM_FIELDS},
        )
    log.warning("%s answered %s: %s", service, response.status_code, body.get("detail"))
    raise ServiceUnavailable(
        f"the {service} service failed", code=f"{service}_error", headers=_retry_after(1)
    )
