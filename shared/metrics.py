"""Prometheus metrics shared by every service, and a pure-ASGI middleware that records them.

Names follow the tutorial's ``multimodal_*`` family so its dashboards and alert rules apply.
Requests are labelled by route template (``/items/{item_id}``), never by raw path, so label
cardinality stays bounded. Prometheus' scrapes and the orchestrator's probes (``QUIET_PATHS``) are
not traffic: they are never counted, so rates, latency percentiles and error ratios describe
what clients asked.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.context import REQUEST_ID_HEADER, request_id_var

REQUESTS = Counter(
    "multimodal_requests_total",
    "HTTP requests handled, by service, route template, method and status code.",
    ["service", "endpoint", "method", "status"],
)
ERRORS = Counter(
    "multimodal_errors_total",
    "HTTP requests answered with a 5xx or failed, by service, route template and error type.",
    ["service", "endpoint", "error_type"],
)
REQUEST_DURATION = Histogram(
    "multimodal_request_duration_seconds",
    "Time to answer an HTTP request, by service and route template.",
    ["service", "endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_UNMATCHED = "unmatched"
_MAX_REQUEST_ID = 128


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or _UNMATCHED


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1").strip()
            if 0 < len(text) <= _MAX_REQUEST_ID and text.isprintable():
                return text
    return None


class RequestMiddleware:
    """Assigns the request id (keeping a caller's ``X-Request-ID``) and records request metrics."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # By path, not by route: a scrape or probe is quiet whatever the router calls it.
        counted = scope.get("path") not in QUIET_PATHS
        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        token = request_id_var.set(request_id)
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.lower().encode(), request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        error_type: str | None = None
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            error_type = type(exc).__name__
            raise
        finally:
            if counted:
                endpoint = _route_template(scope)
                REQUESTS.labels(self.service, endpoint, scope["method"], str(status)).inc()
                REQUEST_DURATION.labels(self.service, endpoint).observe(
                    time.perf_counter() - started
                )
                # One count per failed request: by exception type when one escaped, else by
                # status (the 500 an escaped exception becomes is the same failure).
                if error_type is None and status >= 500:
                    error_type = f"http_{status}"
                if error_type is not None:
                    ERRORS.labels(self.service, endpoint, error_type).inc()
            request_id_var.reset(token)


def start_error_series(service: str, routes: Iterable[BaseRoute]) -> None:
    """Create each route's ``http_500`` error series at 0, so an error ratio reads 0 in a
    healthy stack instead of having no data."""
    for route in routes:
        path = getattr(route, "path", None)
        if path and path not in QUIET_PATHS and isinstance(route, Route):
            ERRORS.labels(service, path, "http_500")


async def metrics_endpoint(_: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
