"""The pieces every service's ``create_app()`` assembles: error handlers, the request middleware
(request id, trace context, metrics, a JSON access line per request), ``/healthz``, ``/readyz``
and ``/metrics``; the service-token check of an internal service (``shared.service_auth``); a
request body size limit a service can opt into; and ``serve()`` for ``python -m``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from http import HTTPStatus
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import start_http_server
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.importer import import_from_string

from shared.context import REQUEST_ID_HEADER, request_id_var
from shared.logs import FIELDS, configure_logging
from shared.metrics import (
    MULTIPROCESS_DIR_ENV,
    QUIET_PATHS,
    SUPERVISOR_PID_ENV,
    metrics_endpoint,
    record_request,
    route_template,
    scrape_registry,
    start_error_series,
)
from shared.problems import (
    PROBLEM_CONTENT_TYPE,
    PROBLEM_TYPE_BASE,
    install_problem_handlers,
    problem_response,
)
from shared.service_auth import CallerVerifier, ServiceTokenMiddleware
from shared.settings import ServiceSettings
from shared.tracing import TRACERESPONSE, Span, span_var, start_span

# A readiness check returns None when ready, or a short reason when not.
ReadinessCheck = Callable[[FastAPI], Awaitable[str | None]]

access_log = logging.getLogger("access")
log = logging.getLogger(__name__)

_REQUEST_ID_HEADER = REQUEST_ID_HEADER.lower().encode()
_TRACERESPONSE_HEADER = TRACERESPONSE.encode()
_MAX_REQUEST_ID = 128


class RequestMiddleware:
    """Outermost of a service's middleware, pure ASGI. Per request: the request id (the caller's
    ``X-Request-ID`` when printable and at most 128 characters, else a new one), the span of the
    trace (``shared.tracing``: the caller's ``traceparent`` continued, else a new trace), both in
    context for every log line and outgoing call and on the response (``X-Request-ID``,
    ``traceresponse``); the request metrics; one JSON access line. Probes and scrapes
    (``QUIET_PATHS``) are neither counted nor logged: they would drown the log. An exception
    nothing else handled is answered here, a 500 problem with the request id, so its traceback
    is logged once, with the request's ids."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id: str | None = None
        traceparent: str | None = None
        parents = 0
        tracestate: str | None = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                if request_id is None:
                    text = value.decode("latin-1").strip()
                    if 0 < len(text) <= _MAX_REQUEST_ID and text.isprintable():
                        request_id = text
            elif name == b"traceparent":
                traceparent = value.decode("latin-1")
                parents += 1
            elif name == b"tracestate":
                text = value.decode("latin-1")
                # Several fields are one list (RFC 9110 field order).
                tracestate = text if tracestate is None else f"{tracestate},{text}"
        if request_id is None:
            request_id = uuid.uuid4().hex
        # Two traceparent fields are not one valid value: a new trace.
        span = start_span(traceparent if parents == 1 else None, tracestate)
        request_token = request_id_var.set(request_id)
        span_token = span_var.set(span)
        added = [
            (_REQUEST_ID_HEADER, request_id.encode("latin-1")),
            (_TRACERESPONSE_HEADER, span.traceparent.encode()),
        ]
        status = 500
        responded = False
        finished: float | None = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status, responded, finished
            if message["type"] == "http.response.start":
                status = message["status"]
                responded = True
                message = {**message, "headers": [*message.get("headers", ()), *added]}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                # Answered: background tasks after this are not the client's wait.
                finished = time.perf_counter()
            await send(message)

        error_type: str | None = None
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            error_type = type(exc).__name__
            log.exception("unhandled error on %s %s", scope["method"], route_template(scope))
            if responded:  # too late for a problem body: the server drops the connection
                raise
            await problem_response(
                None,
                500,
                "internal_error",
                "internal server error",
                extra={"instance": scope.get("path", "")},
            )(scope, receive, send_wrapper)
        finally:
            if scope["path"] not in QUIET_PATHS:
                seconds = (finished or time.perf_counter()) - started
                endpoint = route_template(scope)
                record_request(self.service, endpoint, scope["method"], status, seconds, error_type)
                if access_log.isEnabledFor(logging.INFO):
                    self._log(scope, endpoint, status, seconds, span)
            span_var.reset(span_token)
            request_id_var.reset(request_token)

    @staticmethod
    def _log(scope: Scope, endpoint: str, status: int, seconds: float, span: Span) -> None:
        client = scope.get("client")
        # The route template, never the path or query: they can carry ids and data.
        access_log.info(
            "%s %s %d",
            scope["method"],
            endpoint,
            status,
            extra={
                FIELDS: {
                    "method": scope["method"],
                    "route": endpoint,
                    "status": status,
                    "latency_ms": round(seconds * 1000, 3),
                    "client": client[0] if client else None,
                    "parent_id": span.parent_id,
                }
            },
        )


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` when a streamed body passes the limit; an HTTPException so the
    framework's body parsing lets it through and the problem handler answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes")


class BodySizeLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` (``max_json_bytes`` for JSON bodies) with a 413
    problem: at once when ``Content-Length`` says so, else as soon as the streamed body passes
    the limit, so an oversized upload is never read whole into memory."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_json_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_json_bytes = max_json_bytes

    def _limit(self, scope: Scope) -> int:
        for name, value in scope.get("headers", ()):
            if name == b"content-type" and self.max_json_bytes is not None:
                media = value.decode("latin-1").split(";")[0].strip().lower()
                if media == "application/json" or media.endswith("+json"):
                    return min(self.max_bytes, self.max_json_bytes)
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    await _send_problem(scope, send, 413, "payload_too_large", BodyTooLarge(limit))
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)


async def _send_problem(
    scope: Scope, send: Send, status: int, code: str, exc: StarletteHTTPException
) -> None:
    body = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": str(exc.detail),
        "code": code,
        "instance": scope.get("path", ""),
    }
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
                (b"content-length", str(len(payload)).encode()),
                # The client may still be sending: tell it the connection will not be reused.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _verifying(
    verifier: CallerVerifier, lifespan: Callable[[FastAPI], AbstractAsyncContextManager[Any]]
) -> Callable[[FastAPI], AbstractAsyncContextManager[Any]]:
    """``lifespan`` inside the verifier's start and close."""

    @asynccontextmanager
    async def both(app: FastAPI) -> AsyncIterator[Any]:
        await verifier.start()
        try:
            async with lifespan(app) as state:
                yield state
        finally:
            await verifier.aclose()

    return both


def _counting_errors(
    service: str, lifespan: Callable[[FastAPI], AbstractAsyncContextManager[Any]]
) -> Callable[[FastAPI], AbstractAsyncContextManager[Any]]:
    """``lifespan`` after the error series of every route (all registered by then) start at 0."""

    @asynccontextmanager
    async def counted(app: FastAPI) -> AsyncIterator[Any]:
        start_error_series(service, app.routes)
        async with lifespan(app) as state:
            yield state

    return counted


def build_app(
    service: str,
    *,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[Any]],
    readiness: ReadinessCheck,
    version: str = "0.1.0",
    description: str = "",
    middleware: Sequence[Middleware] = (),
    callers: CallerVerifier | None = None,
) -> FastAPI:
    """The service skeleton. ``middleware`` (outermost first) runs inside ``RequestMiddleware``,
    so whatever it answers still carries the request id and trace and is logged.
    With ``callers`` (an internal service), every request but the open paths needs a service
    token, checked before ``middleware``; the verifier starts and stops with the lifespan."""
    lifespan = _counting_errors(service, lifespan)
    if callers is not None:
        lifespan = _verifying(callers, lifespan)
        middleware = [Middleware(ServiceTokenMiddleware, verifier=callers), *middleware]
    app = FastAPI(
        title=f"crossmodal-{service}",
        version=version,
        description=description,
        lifespan=lifespan,
        middleware=[Middleware(RequestMiddleware, service=service), *middleware],
        # Metrics are Prometheus' (shared.metrics); FastAPI's OpenTelemetry hooks would only
        # look up the environment for a provider on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_problem_handlers(app)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        try:
            reason = await readiness(request.app)
        except Exception as exc:  # a failing check means "not ready", never a crash
            reason = f"{type(exc).__name__}: {exc}"
        if reason:
            return problem_response(request, 503, "not_ready", reason)
        return JSONResponse({"status": "ready"})

    app.add_route("/metrics", metrics_endpoint, include_in_schema=False)
    return app


def uvicorn_options(
    settings: ServiceSettings, *, trusted_proxies: Sequence[str] = ()
) -> dict[str, Any]:
    """How ``serve`` runs uvicorn. ``X-Forwarded-For`` and ``X-Forwarded-Proto`` are read only
    from a peer in ``trusted_proxies`` (addresses or networks); with none, not at all. (Left to
    itself, uvicorn would trust them from 127.0.0.1, or from ``FORWARDED_ALLOW_IPS``: any local
    process could pick the address its requests are limited by.)"""
    return {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": 10,
        "proxy_headers": bool(trusted_proxies),
        "forwarded_allow_ips": list(trusted_proxies),
    }


# How a worker process learns which app to build: uvicorn spawns a fresh interpreter for each
# worker, which inherits the environment and imports ``worker_app``.
_WORKER_ENV = "CROSSMODAL_WORKER"


def worker_app() -> FastAPI:
    """The app of one worker of several: logging as in ``serve``, then the service's factory."""
    spec = json.loads(os.environ[_WORKER_ENV])
    configure_logging(spec["service"], spec["log_level"])
    factory: Callable[[], FastAPI] = import_from_string(spec["factory"])
    return factory()


def serve(
    service: str,
    factory: Callable[[], FastAPI],
    settings: ServiceSettings,
    *,
    trusted_proxies: Sequence[str] = (),
    workers: int = 1,
) -> None:
    """Run one service in the foreground: the command ``make run``, compose and Kubernetes use.
    Only the gateway has proxies in front (``trusted_proxies``); the internal services take
    their peer's address as it is. With ``workers`` above 1 (a stateless service only), uvicorn
    supervises that many processes accepting on the one port, and the metrics of them all are
    kept in a private directory (``shared.metrics``) that is removed on exit."""
    configure_logging(service, settings.log_level)
    options = uvicorn_options(settings, trusted_proxies=trusted_proxies)
    if workers == 1:
        if settings.metrics_port is not None:
            # prometheus_client's server, on a thread of its own: every path answers the scrape.
            start_http_server(settings.metrics_port, addr=settings.host)
        uvicorn.run(factory, factory=True, **options)
        return
    metrics_dir = tempfile.mkdtemp(prefix=f"{service}-metrics-")
    os.environ[MULTIPROCESS_DIR_ENV] = metrics_dir
    os.environ[SUPERVISOR_PID_ENV] = str(os.getpid())
    os.environ[_WORKER_ENV] = json.dumps(
        {
            "service": service,
            "factory": f"{factory.__module__}:{factory.__qualname__}",
            "log_level": settings.log_level,
        }
    )
    try:
        if settings.metrics_port is not None:
            start_http_server(settings.metrics_port, addr=settings.host, registry=scrape_registry())
        log.info("starting %d workers", workers, extra={FIELDS: {"workers": workers}})
        uvicorn.run("shared.app:worker_app", factory=True, workers=workers, **options)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
