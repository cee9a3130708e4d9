"""W3C trace context through the running stack: a client's ``traceparent`` reaches every service a
request touches, and the JSON logs give back the trace with one span per service and request,
each the child of the gateway's."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import httpx

from crossmodal.stack import SERVICES, LocalStack
from tests.integration.support import DEMO_USER

BACKENDS = ("feature", "retrieval", "metadata")


def _access_lines(path: Path, trace_id: str) -> list[dict[str, Any]]:
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        if trace_id in raw:
            entry = json.loads(raw)  # every line is one JSON object
            assert entry["trace_id"] == trace_id
            if entry["logger"] == "access":
                lines.append(entry)
    return lines


def _traceresponse(response: httpx.Response) -> tuple[str, str]:
    version, trace_id, span_id, _flags = response.headers["traceresponse"].split("-")
    assert version == "00"
    return trace_id, span_id


def test_a_search_is_one_trace_across_the_services(
    gateway: httpx.Client, stack: LocalStack, shapes: dict
) -> None:
    trace_id = secrets.token_hex(16)
    login_parent, search_parent = secrets.token_hex(8), secrets.token_hex(8)
    # A login (gateway, auth), then a search (gateway, feature, metadata, retrieval): two
    # requests of the client's one trace, each with the client's span as parent.
    response = gateway.post(
        "/auth/token",
        data={"grant_type": "password", "username": DEMO_USER[0], "password": DEMO_USER[1]},
        headers={"traceparent": f"00-{trace_id}-{login_parent}-01"},
    )
    assert response.status_code == 200, response.text
    login_span = _traceresponse(response)
    response = gateway.post(
        "/search/text",
        headers={
            "Authorization": f"Bearer {response.json()['access_token']}",
            "traceparent": f"00-{trace_id}-{search_parent}-01",
            "tracestate": "congo=t61rcWkgMzE",
        },
        json={
            "query": f"a red circle {secrets.token_hex(4)}",  # fresh: no cache short-cut
            "collection": "shapes",
            "filters": {"shape": "circle"},
        },
    )
    assert response.status_code == 200, response.text
    search_span = _traceresponse(response)
    assert login_span[0] == search_span[0] == trace_id

    logs = stack.data_dir / "logs"
    names = [spec.name for spec in SERVICES]
    deadline = time.monotonic() + 10
    found: dict[str, list[dict[str, Any]]] = {}
    while time.monotonic() < deadline:
        found = {name: _access_lines(logs / f"{name}.log", trace_id) for name in names}
        # The gateway's line of the search is written once the answer has gone out.
        if all(found.values()) and len(found["gateway"]) >= 2:
            break
        time.sleep(0.2)
    assert {name for name, lines in found.items() if lines} == set(names)

    gateway_lines = {line["route"]: line for line in found["gateway"]}
    login, search = gateway_lines["/auth/token"], gateway_lines["/search/text"]
    assert (login["parent_id"], login["span_id"]) == (login_parent, login_span[1])
    assert (search["parent_id"], search["span_id"]) == (search_parent, search_span[1])
    # The backends' spans are children of the gateway's search span, under its request id.
    for name in BACKENDS:
        for line in found[name]:
            assert line["parent_id"] == search["span_id"], (name, line)
            assert line["request_id"] == search["request_id"], (name, line)
    spans = [line["span_id"] for lines in found.values() for line in lines]
    assert len(spans) == len(set(spans))  # each request handled is a span of its own
    # Auth answered the login as its child; any other call to auth in the trace (a service
    # token or signing keys fetched on the way) is the child of the span that made it.
    auth_parents = {line["parent_id"] for line in found["auth"]}
    assert login["span_id"] in auth_parents
    assert auth_parents <= set(spans)
    for name, lines in found.items():
        assert all(line["service"] == name for line in lines)
