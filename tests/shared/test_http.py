"""ServiceClient: downstream problems pass through, failures become 503/504, ids propagate."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from shared.context import request_id_var
from shared.http import ServiceClient
from shared.problems import (
    GatewayTimeout,
    ProblemError,
    ServiceUnavailable,
    install_problem_handlers,
)
from shared.problems import NotFound as NotFoundError

pytestmark = pytest.mark.anyio


def downstream() -> tuple[FastAPI, dict[str, int]]:
    app = FastAPI()
    install_problem_handlers(app)
    calls = {"flaky": 0, "broken": 0}

    @app.get("/missing")
    async def missing() -> None:
        raise NotFoundError("nothing here", code="thing_not_found")

    @app.get("/echo-id")
    async def echo_id(request: Request) -> dict[str, str | None]:
        return {"id": request.headers.get("x-request-id")}

    @app.get("/flaky")
    async def flaky() -> dict[str, int]:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise RuntimeError("transient")
        return {"calls": calls["flaky"]}

    @app.post("/broken")
    async def broken() -> None:
        calls["broken"] += 1
        raise RuntimeError("always")

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        await asyncio.sleep(2)
        return {"slow": True}

    return app, calls


def client_for(app: FastAPI, **kwargs) -> ServiceClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return ServiceClient("down", "http://down", transport=transport, backoff=0.001, **kwargs)


async def test_downstream_4xx_keeps_status_and_code() -> None:
    app, _ = downstream()
    client = client_for(app)
    with pytest.raises(ProblemError) as raised:
        await client.request("GET", "/missing")
    assert raised.value.status == 404
    assert raised.value.code == "thing_not_found"
    assert raised.value.detail == "nothing here"


async def test_idempotent_requests_retry_5xx_and_posts_do_not() -> None:
    app, calls = downstream()
    client = client_for(app, retries=2)
    response = await client.request("GET", "/flaky")
    assert response.json() == {"calls": 3}
    with pytest.raises(ServiceUnavailable) as raised:
        await client.request("POST", "/broken")
    assert calls["broken"] == 1
    assert raised.value.code == "down_error"


async def test_request_id_is_forwarded() -> None:
    app, _ = downstream()
    client = client_for(app)
    token = request_id_var.set("req-42")
    try:
        response = await client.request("GET", "/echo-id")
    finally:
        request_id_var.reset(token)
    assert response.json() == {"id": "req-42"}


async def test_unreachable_service_is_503() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ServiceClient("down", f"http://127.0.0.1:{port}", retries=1, backoff=0.001)
    with pytest.raises(ServiceUnavailable) as raised:
        await client.request("GET", "/anything")
    assert raised.value.code == "down_unavailable"
    assert raised.value.headers["Retry-After"] == "1"
    await client.aclose()


async def test_slow_service_is_504_within_the_timeout() -> None:
    app, _ = downstream()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    client = ServiceClient("down", f"http://127.0.0.1:{port}", timeout=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(GatewayTimeout) as raised:
            await client.request("GET", "/slow")
        assert raised.value.code == "down_timeout"
        assert loop.time() - started < 1.5  # no retry piled on a timed-out call
    finally:
        await client.aclose()
        server.should_exit = True
        await task
