"""Prometheus metrics shared by every service; ``shared.app.RequestMiddleware`` records them.

Names follow the tutorial's ``multimodal_*`` family so its dashboards and alert rules apply.
Requests are labelled by route template (``/items/{item_id}``), never by raw path, so label
cardinality stays bounded. Prometheus' scrapes and the orchestrator's probes (``QUIET_PATHS``) are
not traffic: they are never counted, so rates, latency percentiles and error ratios describe
what clients asked.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Scope

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
UNMATCHED = "unmatched"


def route_template(scope: Scope) -> str:
    """The template of the route that answered (``/items/{item_id}``), ``unmatched`` for none."""
    route = scope.get("route")
    return getattr(route, "path", None) or UNMATCHED


def record_request(
    service: str,
    endpoint: str,
    method: str,
    status: int,
    seconds: float,
    error_type: str | None = None,
) -> None:
    """Count one request (not a probe or scrape; the caller leaves those out). ``error_type``
    names the exception that escaped, if any."""
    REQUESTS.labels(service, endpoint, method, str(status)).inc()
    REQUEST_DURATION.labels(service, endpoint).observe(seconds)
    # One count per failed request: by exception type when one escaped, else by status (the
    # 500 an escaped exception becomes is the same failure).
    if error_type is None and status >= 500:
        error_type = f"http_{status}"
    if error_type is not None:
        ERRORS.labels(service, endpoint, error_type).inc()


def start_error_series(service: str, routes: Iterable[BaseRoute]) -> None:
    """Create each route's ``http_500`` error series at 0, so an error ratio reads 0 in a
    healthy stack instead of having no data."""
    for route in routes:
        path = getattr(route, "path", None)
        if path and path not in QUIET_PATHS and isinstance(route, Route):
            ERRORS.labels(service, path, "http_500")


async def metrics_endpoint(_: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
