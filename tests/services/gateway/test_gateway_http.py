"""The gateway's HTTP surface that needs no downstream service: the OpenAPI document (every
public endpoint, its scopes, its problem bodies), CORS, body size limits, upload type checks, and
the settings that configure them."""

from __future__ import annotations

import io
from typing import Any

import pytest
from fastapi import UploadFile
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import Headers

from services.gateway.app import create_app
from services.gateway.settings import DEFAULT_RATE_LIMITS, GatewaySettings, RateLimit
from services.gateway.uploads import read_upload, sniff_image_type
from shared.problems import PayloadTooLarge, Unprocessable, UnsupportedMediaType

PUBLIC_ROUTES = {
    ("post", "/auth/token"): None,
    ("post", "/auth/revoke"): None,
    ("post", "/search/text"): "search:text",
    ("post", "/search/image"): "search:image",
    ("post", "/items"): "items:write",
    ("post", "/items/{item_id}/merge"): "items:write",
    ("get", "/items/{item_id}"): "items:read",
    ("get", "/items/{item_id}/image"): "items:read",
    ("delete", "/items/{item_id}"): "items:write",
    ("get", "/collections"): "items:read",
    ("get", "/collections/{collection}"): "items:read",
    ("post", "/collections"): "admin",
    ("delete", "/collections/{collection}"): "admin",
    ("get", "/deletions/{deletion_id}"): "admin",
    ("post", "/collections/{collection}/hashes"): "items:write",
    ("get", "/admin/principals"): "admin",
    ("post", "/admin/principals"): "admin",
    ("get", "/admin/principals/{name}"): "admin",
    ("patch", "/admin/principals/{name}"): "admin",
    ("post", "/admin/principals/{name}/revoke-tokens"): "admin",
    ("post", "/admin/revocations"): "admin",
    ("get", "/admin/keys"): "admin",
    ("post", "/admin/keys/rotate"): "admin",
}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    # No lifespan: the document and the docs page need no backend.
    return TestClient(create_app(GatewaySettings())).get("/openapi.json").json()


def _operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): operation
        for path, item in doc["paths"].items()
        for method, operation in item.items()
    }


def test_every_public_endpoint_is_documented(doc: dict[str, Any]) -> None:
    assert set(_operations(doc)) == set(PUBLIC_ROUTES)


def test_each_endpoint_names_its_scope(doc: dict[str, Any]) -> None:
    scheme = doc["components"]["securitySchemes"]["OAuth2"]
    assert scheme["flows"]["password"]["tokenUrl"] == "/auth/token"
    assert set(scheme["flows"]["password"]["scopes"]) == {
        "search:text",
        "search:image",
        "items:read",
        "items:write",
        "admin",
    }
    for key, operation in _operations(doc).items():
        scope = PUBLIC_ROUTES[key]
        if scope is None:
            assert "security" not in operation, key
        else:
            assert operation["security"] == [{"OAuth2": [scope]}], key
            assert scope in operation["summary"], key


def test_error_bodies_are_problems(doc: dict[str, Any]) -> None:
    problem = doc["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "detail", "code"} <= set(problem["required"])
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for key, operation in _operations(doc).items():
        statuses = {s for s in operation["responses"] if s.startswith(("4", "5"))}
        expected = {"401", "403", "422", "429", "503"} if PUBLIC_ROUTES[key] else {"429", "503"}
        assert expected <= statuses, key
        for status in statuses:
            content = operation["responses"][status]["content"]
            assert content == {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
            }, (key, status)


def test_every_body_can_be_malformed_or_too_large(doc: dict[str, Any]) -> None:
    # Both are answered before the route runs, whatever the route.
    with_body = {key: op for key, op in _operations(doc).items() if "requestBody" in op}
    assert len(with_body) == 11
    for key, operation in with_body.items():
        assert {"400", "413"} <= set(operation["responses"]), key


def test_bodies_and_form_fields_are_described(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    operations = _operations(doc)

    def body(method: str, path: str, media_type: str = "application/json") -> dict[str, Any]:
        content = operations[(method, path)]["requestBody"]["content"][media_type]
        return schemas[content["schema"]["$ref"].rsplit("/", 1)[1]]  # type: ignore[no-any-return]

    assert body("post", "/collections")["required"] == ["name"]
    hashes = body("post", "/collections/{collection}/hashes")["properties"]["sha256"]
    assert hashes["maxItems"] * 68 < 64 * 1024  # fits the default JSON body limit
    assert body("post", "/search/text")["properties"]["filters"]["anyOf"][0] == {
        "$ref": "#/components/schemas/Filter"
    }
    form = body("post", "/items", "multipart/form-data")["properties"]
    assert form["attributes"]["allOf"] == [{"$ref": "#/components/schemas/Attributes"}]
    assert form["source_uri"]["pattern"].startswith("^")
    assert [branch.get("type") for branch in form["caption"]["anyOf"]] == ["array", "string"]
    merge = body("post", "/items/{item_id}/merge")
    assert merge["additionalProperties"] is False and "required" not in merge
    assert merge["properties"]["attributes"]["allOf"] == [
        {"$ref": "#/components/schemas/Attributes"}
    ]
    assert merge["properties"]["captions"]["maxItems"] == form["caption"]["anyOf"][0]["maxItems"]
    assert merge["properties"]["captions"]["items"] == form["caption"]["anyOf"][1]
    assert merge["properties"]["tags"]["items"] == form["tag"]["anyOf"][1]
    for path in ("/items", "/search/image"):
        encoding = operations[("post", path)]["requestBody"]["content"]["multipart/form-data"]
        assert encoding["encoding"]["image"]["contentType"].split(", ") == list(
            GatewaySettings().allowed_upload_types
        )
    assert {"Filter", "AttributeCondition", "TagCondition", "AttributeValue"} <= set(schemas)


def test_created_resources_link_to_their_operations(doc: dict[str, Any]) -> None:
    operations = _operations(doc)
    for key, parameter, targets in (
        (("post", "/items"), "item_id", 4),
        (("post", "/collections"), "collection", 3),
        (("post", "/admin/principals"), "name", 3),
    ):
        links = operations[key]["responses"]["201"]["links"]
        assert len(links) == targets, key
        for link in links.values():
            path, method = link["operationRef"].removeprefix("#/paths/").rsplit("/", 1)
            assert (method, path.replace("~1", "/")) in operations
            assert set(link["parameters"]) == {parameter}


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/collections", "GET, POST"),
        ("/collections/demo", "GET, DELETE"),
        ("/items/1", "GET, DELETE"),
        ("/admin/principals", "GET, POST"),
        ("/admin/principals/alice", "GET, PATCH"),
        ("/auth/token", "POST"),
    ],
)
def test_405_names_every_method_of_the_path(path: str, allowed: str) -> None:
    # FastAPI routes each method separately: the router alone would name the first one only.
    response = TestClient(create_app(GatewaySettings())).request("OPTIONS", path)
    assert response.status_code == 405
    assert response.headers["allow"] == allowed
    assert response.json()["code"] == "method_not_allowed"


def test_docs_page_is_served() -> None:
    response = TestClient(create_app(GatewaySettings())).get("/docs")
    assert response.status_code == 200
    assert "swagger" in response.text.lower()


def _client(**settings: Any) -> TestClient:
    return TestClient(create_app(GatewaySettings(**settings)))


def test_cors_is_off_by_default() -> None:
    response = _client().options(
        "/search/text",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in response.headers


def test_cors_allows_the_configured_origins_only() -> None:
    client = _client(cors_allow_origins=["https://app.example"])
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "Authorization, Content-Type",
    }
    response = client.options(
        "/search/text", headers={"Origin": "https://app.example", **preflight}
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    assert "Authorization" in response.headers["access-control-allow-headers"]
    response = client.options(
        "/search/text", headers={"Origin": "https://evil.example", **preflight}
    )
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers
    # A refusal (here a 413 from the size limit) still carries the header, so a browser app
    # can read the problem body.
    response = client.post(
        "/search/text",
        content=b"{}",
        headers={
            "Origin": "https://app.example",
            "Content-Type": "application/json",
            "Content-Length": str(10**7),
        },
    )
    assert response.status_code == 413
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in response.headers["access-control-expose-headers"].lower()


def test_declared_oversized_bodies_are_refused_before_reading() -> None:
    client = _client(max_json_bytes=2048, max_request_bytes=4096)
    response = client.post(
        "/search/text",
        content=b"{}",
        headers={"Content-Type": "application/json", "Content-Length": "5000"},
    )
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "payload_too_large"
    assert response.headers["x-request-id"]  # answered inside the request-id middleware
    # JSON has the tighter limit; a form of the same size is within the request limit (and
    # fails later, here for want of a started app).
    client = TestClient(
        create_app(GatewaySettings(max_json_bytes=2048, max_request_bytes=4096)),
        raise_server_exceptions=False,
    )
    response = client.post(
        "/auth/token",
        content=b"x" * 3000,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code != 413


def test_streamed_oversized_bodies_are_refused() -> None:
    client = _client(max_json_bytes=2048)

    def chunks() -> Any:
        for _ in range(10):
            yield b" " * 1024

    # No Content-Length (chunked): the limit applies while the body is read.
    response = client.post(
        "/search/text", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buffer, format="GIF")
    return buffer.getvalue()


def _upload(data: bytes, content_type: str) -> UploadFile:
    return UploadFile(
        io.BytesIO(data), filename="x", headers=Headers({"content-type": content_type})
    )


def test_sniffing_recognises_image_formats() -> None:
    assert sniff_image_type(_png()) == "image/png"
    assert sniff_image_type(_gif()) == "image/gif"
    assert sniff_image_type(b"\xff\xd8\xff\xe0rest") == "image/jpeg"
    assert sniff_image_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff_image_type(b"%PDF-1.7") is None


@pytest.mark.anyio
async def test_uploads_follow_the_configured_types() -> None:
    allowed = ("image/png", "image/jpeg")
    upload = await read_upload(_upload(_png(), "image/png"), 10**6, allowed)
    assert upload.content_type == "image/png" and upload.data == _png()
    # A common mislabel of an allowed type is understood.
    assert (await read_upload(_upload(_png(), "image/jpg"), 10**6, allowed)).data == _png()
    with pytest.raises(UnsupportedMediaType):
        await read_upload(_upload(_gif(), "image/gif"), 10**6, allowed)
    # A GIF labelled as PNG is refused by its bytes, whatever the label says.
    with pytest.raises(UnsupportedMediaType) as raised:
        await read_upload(_upload(_gif(), "image/png"), 10**6, allowed)
    assert "image/gif" in raised.value.detail
    # Unrecognised bytes are left to the decoders downstream (they answer invalid_image).
    assert (await read_upload(_upload(b"garbage", "image/png"), 10**6, allowed)).data == b"garbage"
    with pytest.raises(PayloadTooLarge) as too_large:
        await read_upload(_upload(_png(), "image/png"), 10, allowed)
    assert too_large.value.code == "image_too_large"
    with pytest.raises(Unprocessable):
        await read_upload(_upload(b"", "image/png"), 10**6, allowed)


def test_rate_limit_settings_merge_with_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_RATE_LIMITS", '{"items:read": {"rate": 1, "burst": 3}}')
    monkeypatch.setenv("GATEWAY_IP_RATE_LIMIT", "null")
    settings = GatewaySettings()
    assert settings.rate_limits["items:read"] == RateLimit(rate=1, burst=3)
    assert settings.rate_limits["search:text"] == DEFAULT_RATE_LIMITS["search:text"]
    assert settings.ip_rate_limit is None


@pytest.mark.parametrize(
    "overrides",
    [
        {"rate_limits": {"root": {"rate": 1, "burst": 1}}},
        {"rate_limits": {"items:read": {"rate": 0, "burst": 1}}},
        {"allowed_upload_types": ["application/pdf"]},
        {"cors_allow_origins": ["*"], "cors_allow_credentials": True},
    ],
)
def test_bad_settings_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        GatewaySettings(**overrides)
