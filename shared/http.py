"""HTTP client for calls between services: explicit timeouts, bounded retries for idempotent
requests, the request id passed along, and upstream failures turned into problem errors."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

from shared.context import REQUEST_ID_HEADER, request_id_var
from shared.problems import GatewayTimeout, ProblemError, ServiceUnavailable

log = logging.getLogger(__name__)

_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.retries = retries
        self.backoff = backoff
        self._client = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request(
        self, method: str, url: str, *, retry: bool | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send one request. ``retry`` defaults to True for idempotent methods only; a POST that
        is safe to repeat (a search, an embedding) passes ``retry=True``."""
        headers = dict(kwargs.pop("headers", None) or {})
        request_id = request_id_var.get()
        if request_id:
            headers.setdefault(REQUEST_ID_HEADER, request_id)
        may_retry = method.upper() in _IDEMPOTENT if retry is None else retry
        attempts = 1 + (self.retries if may_retry else 0)
        for attempt in range(attempts):
            try:
                response = await self._client.request(method, url, headers=headers, **kwargs)
            except httpx.TimeoutException as exc:
                # A timed-out request may still be running: never pile a retry on top of it.
                raise GatewayTimeout(
                    f"the {self.name} service did not answer in time", code=f"{self.name}_timeout"
                ) from exc
            except httpx.TransportError as exc:
                if attempt + 1 < attempts:
                    await asyncio.sleep(self.backoff * 2**attempt)
                    continue
                raise ServiceUnavailable(
                    f"the {self.name} service is unreachable",
                    code=f"{self.name}_unavailable",
                    headers={"Retry-After": "1"},
                ) from exc
            if response.status_code >= 500 and attempt + 1 < attempts:
                await asyncio.sleep(self.backoff * 2**attempt)
                continue
            _raise_for_problem(self.name, response)
            return response
        raise AssertionError("unreachable")


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
        raise ProblemError(
            str(body.get("detail") or f"{service} rejected the request"),
            status=response.status_code,
            code=str(body.get("code") or "bad_request"),
            extra={k: v for k, v in body.items() if k == "errors"},
        )
    log.warning("%s answered %s: %s", service, response.status_code, body.get("detail"))
    raise ServiceUnavailable(
        f"the {service} service failed", code=f"{service}_error", headers={"Retry-After": "1"}
    )
