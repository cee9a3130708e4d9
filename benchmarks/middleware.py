"""CPU per request of the service skeleton (``shared.app.build_app``): its request middleware, the
problem handlers and the router, against a bare FastAPI app with the same route. Direct ASGI calls
in one process, no sockets, so only the framework's and the middleware's work is timed; the access
log is written through the services' own formatter to /dev/null, or off (``LOG_LEVEL=warning``).

    .venv/bin/python -m benchmarks.middleware [--requests 20000] [--repeat 7]

Prints the process' CPU time per request in microseconds (best and median of the repeats) for each
case: CPU rather than wall time, so other work on the machine disturbs the figures less.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from shared.app import build_app
from shared.logs import configure_logging

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def service_app() -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield

    async def readiness(_: FastAPI) -> str | None:
        return None

    app = build_app("bench", lifespan=lifespan, readiness=readiness)

    @app.get("/things/{thing_id}")
    async def get_thing(thing_id: int) -> dict[str, int]:
        return {"id": thing_id}

    return app


def bare_app() -> FastAPI:
    app = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False})

    @app.get("/things/{thing_id}")
    async def get_thing(thing_id: int) -> dict[str, int]:
        return {"id": thing_id}

    return app


def scope(
    headers: list[tuple[bytes, bytes]], method: str = "GET", path: str = "/things/7"
) -> dict[str, Any]:
    """The HTTP scope of one in-process request (as uvicorn would hand it over)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def run(app: ASGIApp, headers: list[tuple[bytes, bytes]], requests: int) -> float:
    """CPU seconds of ``requests`` calls, one after another."""
    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    base = scope(headers)
    started = time.process_time()
    for _ in range(requests):
        await app(dict(base), _receive, send)
    elapsed = time.process_time() - started
    assert statuses == [200] * requests, set(statuses)
    return elapsed


def measure(
    app: ASGIApp, headers: list[tuple[bytes, bytes]], requests: int, repeat: int
) -> tuple[float, float]:
    """Best and median microseconds per request over ``repeat`` runs, after a warm-up run."""

    async def all_runs() -> list[float]:
        await run(app, headers, requests // 10)
        return [await run(app, headers, requests) for _ in range(repeat)]

    times = [t / requests * 1e6 for t in asyncio.run(all_runs())]
    return min(times), statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    plain = [(b"host", b"bench"), (b"accept", b"*/*"), (b"user-agent", b"bench")]
    traced = [*plain, (b"x-request-id", b"bench-request-1"), (b"traceparent", TRACEPARENT)]
    # The services' logging, to /dev/null: formatting and writing a line is part of the cost.
    devnull = open(os.devnull, "w")  # noqa: SIM115 - open for the whole run
    sys.stderr, stderr = devnull, sys.stderr
    try:
        configure_logging("bench", "info")
    finally:
        sys.stderr = stderr
    service = service_app()
    cases: list[tuple[str, ASGIApp, list[tuple[bytes, bytes]], str]] = [
        ("bare FastAPI app, same route", bare_app(), plain, "info"),
        ("service, log info", service, plain, "info"),
        ("service, log info, X-Request-ID + traceparent", service, traced, "info"),
        ("service, log warning (no access line)", service, plain, "warning"),
    ]
    print(f"{args.requests} requests x {args.repeat}, Python {sys.version.split()[0]}")
    print("| case | best CPU µs/request | median CPU µs/request |")
    print("|---|---:|---:|")
    for name, app, headers, level in cases:
        logging.getLogger().setLevel(level.upper())
        best, median = measure(app, headers, args.requests, args.repeat)
        print(f"| {name} | {best:.1f} | {median:.1f} |", flush=True)


if __name__ == "__main__":
    main()
