"""The common service skeleton: problem bodies, request ids, route-template metrics, probes."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from shared.app import build_app
from shared.problems import NotFound


class Body(BaseModel):
    name: str = Field(min_length=1)
    count: int = Field(ge=1, le=10)


def make_app(ready: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield

    async def readiness(_: FastAPI) -> str | None:
        return None if ready else "model not loaded"

    app = build_app("testsvc", lifespan=lifespan, readiness=readiness)

    @app.get("/things/{thing_id}")
    async def get_thing(thing_id: int) -> dict[str, int]:
        if thing_id == 0:
            raise NotFound("no thing 0", code="thing_not_found", extra={"thing_id": 0})
        if thing_id == 13:
            raise RuntimeError("boom")
        return {"id": thing_id}

    @app.post("/things")
    async def post_thing(body: Body) -> Body:
        return body

    return app


@pytest.fixture
def client() -> TestClient:
    with TestClient(make_app(), raise_server_exceptions=False) as client:
        yield client


def _assert_problem(response, status: int, code: str) -> dict:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["code"] == code
    assert body["type"].endswith("/" + code)
    assert body["title"] and body["detail"]
    return body


def test_domain_error_is_a_problem_body(client: TestClient) -> None:
    body = _assert_problem(client.get("/things/0"), 404, "thing_not_found")
    assert body["detail"] == "no thing 0"
    assert body["thing_id"] == 0
    assert body["instance"] == "/things/0"


def test_validation_error_names_the_field(client: TestClient) -> None:
    body = _assert_problem(
        client.post("/things", json={"name": "x", "count": 99}), 422, "validation_error"
    )
    assert body["detail"].startswith("count:")
    assert body["errors"][0]["loc"] == ["body", "count"]
    _assert_problem(client.get("/things/abc"), 422, "validation_error")
    _assert_problem(
        client.post("/things", content=b"{oops", headers={"content-type": "application/json"}),
        422,
        "validation_error",
    )


def test_unknown_route_and_method(client: TestClient) -> None:
    _assert_problem(client.get("/nothing"), 404, "not_found")
    _assert_problem(client.delete("/things"), 405, "method_not_allowed")


def test_unhandled_error_is_a_500_problem_without_internals(client: TestClient) -> None:
    body = _assert_problem(client.get("/things/13"), 500, "internal_error")
    assert "boom" not in body["detail"]


def test_request_id_is_kept_or_made(client: TestClient) -> None:
    assert (
        client.get("/things/1", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"]
        == "abc-123"
    )
    generated = client.get("/things/1").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)


def test_metrics_are_labelled_by_route_template(client: TestClient) -> None:
    for thing_id in (1, 2, 3, 0):
        client.get(f"/things/{thing_id}")
    text = client.get("/metrics").text
    ok = re.search(
        r'multimodal_requests_total\{endpoint="/things/\{thing_id\}",method="GET",service="testsvc",status="200"\} (\d+)',
        text,
    )
    assert ok and float(ok.group(1)) >= 3
    assert 'endpoint="/things/1"' not in text
    assert 'multimodal_request_duration_seconds_bucket{endpoint="/things/{thing_id}"' in text


def test_probes() -> None:
    with TestClient(make_app(ready=True)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").status_code == 200
    with TestClient(make_app(ready=False)) as client:
        assert client.get("/healthz").status_code == 200
        body = _assert_problem(client.get("/readyz"), 503, "not_ready")
        assert body["detail"] == "model not loaded"


def _samples(text: str, metric: str, service: str) -> dict[str, float]:
    """``metric``'s samples of ``service`` in an exposition, by their label text."""
    found = {}
    for match in re.finditer(rf"^{metric}\{{(.*)\}} (\S+)$", text, re.M):
        if f'service="{service}"' in match.group(1):
            found[match.group(1)] = float(match.group(2))
    return found


def test_scrapes_and_probes_are_not_traffic() -> None:
    with TestClient(build_quiet_app()) as client:
        for _ in range(3):
            client.get("/metrics")
            client.get("/healthz")
            client.get("/readyz")
        client.get("/things/1")
        text = client.get("/metrics").text
    requests = _samples(text, "multimodal_requests_total", "quietsvc")
    durations = _samples(text, "multimodal_request_duration_seconds_count", "quietsvc")
    # The one request a client made, and nothing else: no scrape, no probe, no "unmatched".
    assert list(requests.values()) == [1.0], requests
    assert all('endpoint="/things/{thing_id}"' in labels for labels in [*requests, *durations])


def build_quiet_app() -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield

    async def readiness(_: FastAPI) -> str | None:
        return None

    app = build_app("quietsvc", lifespan=lifespan, readiness=readiness)

    @app.get("/things/{thing_id}")
    async def get_thing(thing_id: int) -> dict[str, int]:
        return {"id": thing_id}

    return app


def test_an_error_is_counted_once_and_error_series_start_at_zero() -> None:
    with TestClient(make_app(), raise_server_exceptions=False) as client:
        before = _samples(client.get("/metrics").text, "multimodal_errors_total", "testsvc")
        # Every route's series exists from the start, so a 5xx ratio reads 0, not "no data".
        assert {
            'endpoint="/things/{thing_id}",error_type="http_500",service="testsvc"',
            'endpoint="/things",error_type="http_500",service="testsvc"',
        } <= before.keys()
        assert not any("/healthz" in labels or "/metrics" in labels for labels in before)
        client.get("/things/13")  # an unhandled RuntimeError: one 500
        after = _samples(client.get("/metrics").text, "multimodal_errors_total", "testsvc")
    grown = {labels: n - before.get(labels, 0.0) for labels, n in after.items()}
    assert {labels: n for labels, n in grown.items() if n} == {
        'endpoint="/things/{thing_id}",error_type="RuntimeError",service="testsvc"': 1.0
    }
