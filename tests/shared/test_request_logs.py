"""The request middleware's JSON log (shared.app.RequestMiddleware, shared.logs): one access line
per request with its ids, route template, status and latency; the ids on every other line of the
request; the trace context on the response and on calls to other services. Probes and scrapes are
not logged."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import PurePosixPath
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from shared.app import build_app, uvicorn_options
from shared.http import ServiceClient
from shared.logs import FIELDS, JsonFormatter
from shared.problems import NotFound
from shared.settings import ServiceSettings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
TRACERESPONSE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")

Lines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def log_lines() -> Iterator[Lines]:
    """Every record of the test as the services write it (``JsonFormatter``), parsed."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("testsvc"))
    # The test client's own lines (httpx logs each request it sends) are not the service's.
    handler.addFilter(lambda record: not record.name.startswith(("httpx", "httpcore")))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def access_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line["logger"] == "access"]


def make_app(service: str = "testsvc", downstream: ServiceClient | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield

    async def readiness(_: FastAPI) -> str | None:
        return None

    app = build_app(service, lifespan=lifespan, readiness=readiness)
    log = logging.getLogger(f"tests.{service}")

    @app.get("/things/{thing_id}")
    async def get_thing(thing_id: int) -> dict[str, Any]:
        log.warning("looking for thing %d", thing_id, extra={FIELDS: {"thing": thing_id}})
        if thing_id == 0:
            raise NotFound("no thing 0", code="thing_not_found")
        if thing_id == 13:
            raise RuntimeError("boom")
        if downstream is not None:
            response = await downstream.request("GET", f"/things/{thing_id}")
            return {"id": thing_id, "downstream": response.json()}
        return {"id": thing_id}

    return app


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(make_app(), raise_server_exceptions=False) as client:
        yield client


def test_one_json_line_per_request_with_its_fields(client: TestClient, log_lines: Lines) -> None:
    response = client.get(
        "/things/7?secret=1", headers={"X-Request-ID": "req-7", "traceparent": TRACEPARENT}
    )
    assert response.status_code == 200
    (line,) = access_lines(log_lines())
    trace_id, span_id, flags = TRACERESPONSE.fullmatch(response.headers["traceresponse"]).groups()
    assert (trace_id, flags) == (TRACE_ID, "01")
    assert span_id != PARENT_ID
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line.pop("timestamp"))
    latency = line.pop("latency_ms")
    assert isinstance(latency, float) and 0 <= latency < 10_000
    assert line == {
        "level": "info",
        "service": "testsvc",
        "logger": "access",
        "msg": "GET /things/{thing_id} 200",
        "request_id": "req-7",
        "trace_id": TRACE_ID,
        "span_id": span_id,
        "parent_id": PARENT_ID,
        "method": "GET",
        "route": "/things/{thing_id}",  # the template: no id, no query string
        "status": 200,
        "client": "testclient",
    }


def test_other_lines_of_a_request_carry_its_ids(client: TestClient, log_lines: Lines) -> None:
    logging.getLogger("tests.outside").warning("before any request")
    client.get("/things/3", headers={"X-Request-ID": "req-3"})
    outside, inside, access = log_lines()
    assert outside["msg"] == "before any request"
    assert not {"request_id", "trace_id", "span_id"} & outside.keys()
    assert inside["msg"] == "looking for thing 3" and inside["thing"] == 3
    assert inside["level"] == "warning" and inside["service"] == "testsvc"
    ids = ("request_id", "trace_id", "span_id")
    assert [inside[k] for k in ids] == [access[k] for k in ids]
    assert inside["request_id"] == "req-3"
    assert access["parent_id"] is None  # no traceparent: a trace of its own


@pytest.mark.parametrize(
    ("path", "status", "route"),
    [
        ("/things/0", 404, "/things/{thing_id}"),  # a domain error
        ("/things/abc", 422, "/things/{thing_id}"),  # validation
        ("/nothing/here", 404, "unmatched"),  # no route: never the raw path
        ("/things/13", 500, "/things/{thing_id}"),  # an unhandled exception
    ],
)
def test_errors_are_logged_with_their_status_and_route(
    client: TestClient, log_lines: Lines, path: str, status: int, route: str
) -> None:
    response = client.get(path)
    assert response.status_code == status
    (line,) = access_lines(log_lines())
    assert (line["status"], line["route"]) == (status, route)
    assert line["request_id"] == response.headers["x-request-id"]
    assert TRACERESPONSE.fullmatch(response.headers["traceresponse"])[1] == line["trace_id"]


def test_a_500_keeps_the_request_id_in_its_body_and_log(
    client: TestClient, log_lines: Lines
) -> None:
    response = client.get("/things/13", headers={"X-Request-ID": "req-13"})
    assert response.status_code == 500
    body = response.json()
    assert body["code"] == "internal_error" and "boom" not in body["detail"]
    assert body["request_id"] == response.headers["x-request-id"] == "req-13"
    errors = [line for line in log_lines() if line["level"] == "error"]
    # The traceback once, with the request's ids (not again, outside the request, by the server).
    (error,) = errors
    assert error["request_id"] == "req-13"
    assert "RuntimeError: boom" in error["exc"]
    (access,) = access_lines(log_lines())
    assert error["trace_id"] == access["trace_id"] and error["span_id"] == access["span_id"]
    # A 4xx body has no request id: nothing to report.
    assert "request_id" not in client.get("/things/0").json()


def test_probes_and_scrapes_are_not_logged(client: TestClient, log_lines: Lines) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        response = client.get(path)
        assert response.status_code == 200
        assert response.headers["x-request-id"] and response.headers["traceresponse"]
    assert access_lines(log_lines()) == []


def test_an_invalid_or_repeated_traceparent_starts_a_new_trace(client: TestClient) -> None:
    for headers in (
        [("traceparent", f"00-{TRACE_ID}-{'0' * 16}-01")],
        [("traceparent", TRACEPARENT), ("traceparent", TRACEPARENT)],
    ):
        response = client.get("/things/1", headers=headers)
        trace_id, _, flags = TRACERESPONSE.fullmatch(response.headers["traceresponse"]).groups()
        assert trace_id != TRACE_ID
        assert flags == "03"  # sampled, random trace id


def test_a_call_to_another_service_continues_the_trace(log_lines: Lines) -> None:
    inner = make_app("inner")
    downstream = ServiceClient("inner", "http://inner", transport=httpx.ASGITransport(app=inner))
    with TestClient(make_app("outer", downstream)) as client:
        response = client.get(
            "/things/5",
            headers={
                "X-Request-ID": "req-5",
                "traceparent": TRACEPARENT,
                "tracestate": "congo=t61rcWkgMzE",
            },
        )
    assert response.status_code == 200
    # Both services log through the one handler here: inner's line is written first.
    inner_line, outer_line = access_lines(log_lines())
    assert inner_line["request_id"] == outer_line["request_id"] == "req-5"
    assert inner_line["trace_id"] == outer_line["trace_id"] == TRACE_ID
    assert outer_line["parent_id"] == PARENT_ID
    assert inner_line["parent_id"] == outer_line["span_id"]
    assert len({PARENT_ID, outer_line["span_id"], inner_line["span_id"]}) == 3


def test_the_server_writes_no_access_log_of_its_own() -> None:
    assert uvicorn_options(ServiceSettings(port=8000))["access_log"] is False


def test_fields_that_are_not_json_are_written_as_text() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    record.fields = {"path": PurePosixPath("/var/data")}
    line = json.loads(JsonFormatter("svc").format(record))
    assert line["msg"] == "hello you" and line["path"] == "/var/data" and line["service"] == "svc"
