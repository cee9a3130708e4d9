"""One principal's hostile input cannot switch search off for another, with every service a real
process: filters with a thousand values, nested a thousand levels deep, past every limit, and
attributes nested as deep, are each answered (a result or a 4xx problem), never a 5xx; the
gateway never retries them, and the metadata service's circuit breaker stays closed for the next
principal's ordinary search."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from crossmodal.demo.shapes import render
from crossmodal.stack import LocalStack
from tests.integration.support import SHAPES_COLLECTION, png_bytes

FILTER_ROUTES = ("/collections/{collection}/filter", "/collections/{collection}/keyword-search")


def new_principal(gateway: httpx.Client, admin: dict[str, str], scopes: str) -> dict[str, str]:
    name, secret = f"p-{uuid.uuid4().hex[:10]}", f"pw-{uuid.uuid4().hex}"
    created = gateway.post(
        "/admin/principals",
        headers=admin,
        json={"name": name, "secret": secret, "scopes": scopes.split()},
    )
    assert created.status_code == 201, created.text
    token = gateway.post(
        "/auth/token", data={"grant_type": "password", "username": name, "password": secret}
    )
    assert token.status_code == 200, token.text
    return {"Authorization": f"Bearer {token.json()['access_token']}"}


def nested(levels: int) -> str:
    return '{"$not": ' * levels + '{"colour": "red"}' + "}" * levels


Request = tuple[str, Callable[[], httpx.Response]]


def hostile_requests(gateway: httpx.Client, auth: dict[str, str]) -> tuple[list[Request], ...]:
    """What a client with search and write scopes can send, each with what it must get: a result
    or a 4xx problem. First a run of the heaviest valid filters, each new (no cached page), then
    everything past a limit."""

    def text(filters: Any = None, raw: str | None = None, mode: str = "vector") -> Any:
        if raw is not None:
            body = f'{{"query": "a red circle", "collection": "{SHAPES_COLLECTION}", '
            body += f'"mode": "{mode}", "filters": {raw}}}'
            return lambda: gateway.post(
                "/search/text",
                headers={**auth, "Content-Type": "application/json"},
                content=body,
            )
        body = {"query": "a red circle", "collection": SHAPES_COLLECTION, "mode": mode}
        return lambda: gateway.post("/search/text", headers=auth, json={**body, "filters": filters})

    image = png_bytes(render("red", "circle"))
    files = {"image": ("q.png", image, "image/png")}

    def image_search(filters: str) -> Any:
        data = {"collection": SHAPES_COLLECTION, "filters": filters}
        return lambda: gateway.post("/search/image", headers=auth, data=data, files=files)

    def add_item(attributes: str) -> Any:
        data = {"collection": SHAPES_COLLECTION, "attributes": attributes}
        return lambda: gateway.post("/items", headers=auth, data=data, files=files)

    def values(n: int) -> list[str]:
        return [f"g{n}-{i}" for i in range(1000)]

    heaviest: list[Request] = []
    for n in range(3):
        heaviest += [
            ("result", text({"colour": {"$in": values(n)}})),
            ("result", text({"colour": {"$nin": values(n)}}, mode="hybrid")),
            ("result", text({"$tags": {"$all": values(n)}}, mode="keyword")),
        ]
    heaviest += [
        ("result", text({"$and": [{"$tags": [f"t{i}", f"x{n}"]} for i in range(256)]}))
        for n in range(2)
    ]
    past_limits: list[Request] = [
        ("4xx", text({"colour": {"$in": [*values(0), "red"]}})),
        ("4xx", text({"$or": [{} for _ in range(257)]}, mode="keyword")),
        ("4xx", text(raw=nested(40))),
        ("4xx", text(raw=nested(300))),  # past what the gateway could send on
        ("4xx", text(raw=nested(5000))),  # past what json.loads can parse
        ("4xx", image_search(nested(1000))),
        ("4xx", image_search("[" * 50_000)),
        ("4xx", add_item('{"colour": ' * 1000 + '"red"' + "}" * 1000)),
        ("4xx", add_item('{"colour": ["red"]}')),
        # Valid JSON that is not text: a lone surrogate, and NUL (which PostgreSQL refuses).
        ("4xx", text(raw='{"colour": "\\ud800"}', mode="hybrid")),
        ("4xx", image_search('{"colour": "red\\u0000"}')),
        ("4xx", add_item('{"colour": "\\udfff"}')),
    ]
    return heaviest, past_limits


def metric(stack: LocalStack, service: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples with ``labels`` on ``service``'s /metrics (0 if none)."""
    response = httpx.get(f"{stack.url(service)}/metrics", timeout=10.0)
    assert response.status_code == 200, response.text
    return sum(
        sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def metadata_filter_calls(stack: LocalStack, status: Callable[[str], bool]) -> float:
    response = httpx.get(f"{stack.url('metadata')}/metrics", timeout=10.0)
    return sum(
        sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == "multimodal_requests_total"
        and sample.labels.get("endpoint") in FILTER_ROUTES
        and status(sample.labels["status"])
    )


def test_one_principal_s_bad_filters_never_open_the_breaker_for_another(
    stack: LocalStack,
    gateway: httpx.Client,
    auth: dict[str, str],
    shapes: dict[str, dict[str, Any]],
) -> None:
    hostile = new_principal(gateway, auth, "search:text search:image items:write")
    other = new_principal(gateway, auth, "search:text")
    failures_before = metadata_filter_calls(stack, lambda status: status.startswith("5"))

    def ordinary_search(top_k: int) -> None:
        response = gateway.post(
            "/search/text",
            headers=other,
            json={
                "query": "a red circle",
                "collection": SHAPES_COLLECTION,
                "filters": {"colour": "red"},
                "top_k": top_k,  # a new page each time: never the cache's
            },
        )
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert results and all(r["item"]["attributes"]["colour"] == "red" for r in results)
        assert metric(stack, "gateway", "multimodal_circuit_breaker_state", target="metadata") == 0

    answers = []
    for top_k, block in enumerate(hostile_requests(gateway, hostile), start=3):
        # Each block is longer than the gateway's default breaker threshold (5 in a row).
        for expected, send in block:
            calls_before = metadata_filter_calls(stack, lambda status: True)
            response = send()
            calls = metadata_filter_calls(stack, lambda status: True) - calls_before
            answers.append((expected, response, calls))
        # The other principal's ordinary search, right after: answered.
        ordinary_search(top_k)
    assert len(answers) >= 20

    for expected, response, calls in answers:
        if expected == "result":
            assert response.status_code == 200, response.text
        else:
            assert 400 <= response.status_code < 500, response.text
            assert response.headers["content-type"].startswith("application/problem+json")
        # At most the allow-list and the keyword ranking (hybrid asks for both): no retries.
        assert calls <= 2, response.request.url
    assert metadata_filter_calls(stack, lambda status: status.startswith("5")) == failures_before
