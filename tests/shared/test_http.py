"""ServiceClient: downstream problems pass through, failures and slowness become 503s within the
request's deadline, request ids and trace context propagate, and the circuit breaker stops calls
to a failing service."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from shared.context import request_id_var
from shared.http import CircuitBreaker, CircuitOpen, ServiceClient, request_deadline
from shared.problems import NotFound as NotFoundError
from shared.problems import (
    ProblemError,
    ServiceUnavailable,
    install_problem_handlers,
)
from shared.tracing import span_var, start_span

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

    @app.get("/echo-trace")
    async def echo_trace(request: Request) -> dict[str, str | None]:
        return {k: request.headers.get(k) for k in ("traceparent", "tracestate")}

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


async def test_trace_context_is_forwarded_with_the_current_span_as_parent() -> None:
    app, _ = downstream()
    client = client_for(app)
    # Outside a request (a background poll) there is no trace to continue.
    response = await client.request("GET", "/echo-trace")
    assert response.json() == {"traceparent": None, "tracestate": None}
    span = start_span("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "congo=t61")
    token = span_var.set(span)
    try:
        response = await client.request("GET", "/echo-trace")
    finally:
        span_var.reset(token)
    assert response.json() == {
        "traceparent": f"00-4bf92f3577b34da6a3ce929d0e0e4736-{span.span_id}-01",
        "tracestate": "congo=t61",
    }


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


async def test_a_dropped_connection_is_retried_and_not_taken_for_a_timeout() -> None:
    """A peer that closes the connection without answering (a service restarting, a reset
    keep-alive connection): the aiohttp transport calls that a connect timeout; the client
    retries it as a transport failure and ends with ``_unavailable``, not ``_timeout``."""
    accepted = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.read(1)  # the request has started arriving
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = ServiceClient("down", f"http://127.0.0.1:{port}", retries=2, backoff=0.001)
    try:
        with pytest.raises(ServiceUnavailable) as raised:
            await client.request("POST", "/search", json={"q": 1}, retry=True)
        assert raised.value.code == "down_unavailable"
        assert accepted == 3  # the first try and two retries
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def slow_server() -> AsyncIterator[str]:
    """The downstream app on a real socket: timeouts need a real connection."""
    app, _ = downstream()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="error", timeout_graceful_shutdown=0
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_slow_service_is_503_within_the_timeout(slow_server: str) -> None:
    client = ServiceClient("down", slow_server, timeout=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(ServiceUnavailable) as raised:
            await client.request("GET", "/slow")
        assert raised.value.status == 503
        assert raised.value.code == "down_timeout"
        assert raised.value.headers["Retry-After"] == "1"
        assert loop.time() - started < 1.5  # no retry piled on a timed-out call
    finally:
        await client.aclose()


async def test_the_request_deadline_bounds_every_call_of_a_request(slow_server: str) -> None:
    client = ServiceClient("down", slow_server, timeout=10.0)
    loop = asyncio.get_running_loop()
    try:
        with request_deadline(0.3):
            started = loop.time()
            with pytest.raises(ServiceUnavailable) as raised:
                await client.request("GET", "/slow")  # 2 s of work, 0.3 s of budget
            assert raised.value.code == "down_timeout"
            assert loop.time() - started < 1.5  # cut off well before the 2 s of work
            # The budget is spent: the next call fails without being sent.
            with pytest.raises(ServiceUnavailable) as raised:
                await client.request("GET", "/echo-id")
            assert "was not called" in raised.value.detail
        # Outside the block the client's own timeout applies again.
        assert (await client.request("GET", "/echo-id")).status_code == 200
    finally:
        await client.aclose()


async def test_a_nested_deadline_never_extends_the_outer_one(slow_server: str) -> None:
    client = ServiceClient("down", slow_server, timeout=10.0)
    loop = asyncio.get_running_loop()
    try:
        with request_deadline(0.2), request_deadline(5.0):
            started = loop.time()
            with pytest.raises(ServiceUnavailable):
                await client.request("GET", "/slow")
            assert loop.time() - started < 1.5  # the outer 0.2 s, not the inner 5 s
    finally:
        await client.aclose()


def test_breaker_opens_after_consecutive_failures_and_probes_after_the_cool_down() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("t", failure_threshold=3, reset_seconds=10, clock=clock)
    for _ in range(2):
        breaker.allow()
        breaker.failure()
    breaker.allow()
    breaker.success()  # a success resets the count: failures must be consecutive
    for _ in range(3):
        breaker.allow()
        breaker.failure()
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen) as raised:
        breaker.allow()
    assert raised.value.retry_after == pytest.approx(10)
    clock.now += 9.5
    with pytest.raises(CircuitOpen):
        breaker.allow()
    clock.now += 0.5
    assert breaker.state == "half_open"
    breaker.allow()  # the single probe
    with pytest.raises(CircuitOpen):
        breaker.allow()  # everyone else waits while it is out
    breaker.failure()  # the probe failed: open again for a full cool-down
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen):
        breaker.allow()
    clock.now += 10
    breaker.allow()
    breaker.success()
    assert breaker.state == "closed"
    breaker.allow()


def test_an_abandoned_probe_lets_the_next_caller_probe() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("t", failure_threshold=1, reset_seconds=1, clock=clock)
    breaker.allow()
    breaker.failure()
    clock.now += 1
    breaker.allow()
    breaker.abandon()  # e.g. the caller was cancelled
    breaker.allow()


async def test_client_with_a_breaker_fails_fast_while_open() -> None:
    app, calls = downstream()
    clock = FakeClock()
    breaker = CircuitBreaker("down", failure_threshold=2, reset_seconds=5, clock=clock)
    client = client_for(app, retries=0, breaker=breaker)
    for _ in range(2):
        with pytest.raises(ServiceUnavailable) as raised:
            await client.request("POST", "/broken")
        assert raised.value.code == "down_error"
    assert calls["broken"] == 2
    with pytest.raises(ServiceUnavailable) as raised:
        await client.request("POST", "/broken")
    assert calls["broken"] == 2  # not called: the circuit is open
    assert raised.value.code == "down_unavailable"
    assert raised.value.extra == {"circuit": "open"}
    assert raised.value.headers["Retry-After"] == "5"
    clock.now += 5
    # The probe goes out; /echo-id succeeds, so the circuit closes.
    assert (await client.request("GET", "/echo-id")).status_code == 200
    assert breaker.state == "closed"


async def test_client_errors_do_not_open_the_breaker() -> None:
    app, _ = downstream()
    breaker = CircuitBreaker("down", failure_threshold=1, reset_seconds=60)
    client = client_for(app, breaker=breaker)
    for _ in range(3):
        with pytest.raises(ProblemError) as raised:
            await client.request("GET", "/missing")
        assert raised.value.status == 404
    assert breaker.state == "closed"


async def test_unreachable_service_opens_the_breaker() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    breaker = CircuitBreaker("down", failure_threshold=1, reset_seconds=60)
    client = ServiceClient(
        "down", f"http://127.0.0.1:{port}", retries=0, backoff=0.001, breaker=breaker
    )
    try:
        with pytest.raises(ServiceUnavailable):
            await client.request("GET", "/anything")
        assert breaker.state == "open"
    finally:
        await client.aclose()


async def test_client_errors_can_be_passed_through() -> None:
    app, _ = downstream()
    response = await client_for(app).request("GET", "/missing", allow_client_errors=True)
    assert response.status_code == 404
    assert response.json()["code"] == "thing_not_found"
