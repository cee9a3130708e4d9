"""The pieces every service's ``create_app()`` assembles: error handlers, request-id and metrics
middleware, an access log line per request, ``/healthz``, ``/readyz`` and ``/metrics``; the
service-token check of an internal service (``shared.service_auth``); a request body size limit
a service can opt into; and ``serve()`` for ``python -m``."""

from __future__ import annotations

import json
import logging
import time
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

from shared.logs import configure_logging
from shared.metrics import QUIET_PATHS, RequestMiddleware, metrics_endpoint, start_error_series
from shared.problems import (
    PROBLEM_CONTENT_TYPE,
    PROBLEM_TYPE_BASE,
    install_problem_handlers,
    problem_response,
)
from shared.service_auth import CallerVerifier, ServiceTokenMiddleware
from shared.settings import ServiceSettings

# A readiness check returns None when ready, or a short reason when not.
ReadinessCheck = Callable[[FastAPI], Awaitable[str | None]]

access_log = logging.getLogger("access")


class AccessLogMiddleware:
    """One log line per request (method, path, status, duration). It runs inside the request-id
    middleware, so the line carries the request id: one search can be followed through the log
    of every service it touched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in QUIET_PATHS:
            # Probes and scrapes would drown the log; everything else gets one line.
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # The path only: query strings could carry data that does not belong in logs.
            access_log.info(
                "%s %s %d %.1fms",
                scope.get("method", ""),
                scope.get("path", ""),
                status,
                (time.perf_counter() - started) * 1000,
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
    """The service skeleton. ``middleware`` (outermost first) runs inside the request-id and
    access-log middleware, so whatever it answers still carries a request id and is logged.
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
        middleware=[Middleware(AccessLogMiddleware), *middleware],
        # Metrics are Prometheus' (shared.metrics); FastAPI's OpenTelemetry hooks would only
        # look up the environment for a provider on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_problem_handlers(app)
    app.add_middleware(RequestMiddleware, service=service)

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


def serve(
    service: str,
    factory: Callable[[], FastAPI],
    settings: ServiceSettings,
    *,
    trusted_proxies: Sequence[str] = (),
) -> None:
    """Run one service in the foreground: the command ``make run``, compose and Kubernetes use.
    Only the gateway has proxies in front (``trusted_proxies``); the internal services take
    their peer's address as it is."""
    configure_logging(service, settings.log_level)
    if settings.metrics_port is not None:
        # prometheus_client's server, on a thread of its own: every path answers the scrape.
        start_http_server(settings.metrics_port, addr=settings.host)
    uvicorn.run(factory, factory=True, **uvicorn_options(settings, trusted_proxies=trusted_proxies))
