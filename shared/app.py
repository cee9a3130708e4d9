"""The pieces every service's ``create_app()`` assembles: error handlers, request-id and metrics
middleware, ``/healthz``, ``/readyz`` and ``/metrics``; and ``serve()`` for ``python -m``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from shared.logs import configure_logging
from shared.metrics import RequestMiddleware, metrics_endpoint
from shared.problems import install_problem_handlers, problem_response
from shared.settings import ServiceSettings

# A readiness check returns None when ready, or a short reason when not.
ReadinessCheck = Callable[[FastAPI], Awaitable[str | None]]


def build_app(
    service: str,
    *,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[Any]],
    readiness: ReadinessCheck,
    version: str = "0.1.0",
    description: str = "",
) -> FastAPI:
    app = FastAPI(
        title=f"crossmodal-{service}", version=version, description=description, lifespan=lifespan
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


def serve(service: str, factory: Callable[[], FastAPI], settings: ServiceSettings) -> None:
    """Run one service in the foreground: the command ``make run``, compose and Kubernetes use."""
    configure_logging(service, settings.log_level)
    uvicorn.run(
        factory,
        factory=True,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
