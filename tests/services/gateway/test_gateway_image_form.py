"""``POST /search/image``'s form, read from the raw body (``uploads.read_image_search_form``):
the same fields, defaults and validation errors as FastAPI's own form handling of the same
signature (the `/fastapi` route of benchmarks/image_form.py); 400 for a body that does not parse."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from benchmarks.image_form import form_app
from services.gateway.uploads import ImageQuery, read_image_search_form
from shared.problems import BadRequest, PayloadTooLarge, UnsupportedMediaType

ALLOWED = ("image/jpeg", "image/png")
MAX_BYTES = 10_000
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100

pytestmark = pytest.mark.anyio


def _reference_app() -> FastAPI:
    """The route's former signature, as FastAPI reads it: its answers are the contract."""
    app = form_app()

    @app.exception_handler(RequestValidationError)
    async def errors(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"errors": _summary(exc.errors())}, status_code=422)

    return app


REFERENCE = TestClient(_reference_app())


def _summary(errors: Any) -> list[tuple[str, tuple[str, ...], str]]:
    return sorted((e["type"], tuple(str(p) for p in e["loc"]), e["msg"]) for e in errors)


def _encoded(files: Any = None, data: Any = None, **kwargs: Any) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://gateway/search/image", files=files, data=data, **kwargs)
    return request.read(), request.headers.get("content-type", "")


async def _read(body: bytes, content_type: str) -> ImageQuery:
    headers = [(b"content-type", content_type.encode())] if content_type else []
    scope = {"type": "http", "method": "POST", "path": "/search/image", "headers": headers}
    messages = iter([{"type": "http.request", "body": body, "more_body": False}])

    async def receive() -> dict[str, Any]:
        return next(messages)

    return await read_image_search_form(Request(scope, receive), MAX_BYTES, ALLOWED)


IMAGE = {"image": ("query.png", PNG, "image/png")}

# (files, data): forms whose answer, valid or not, must be FastAPI's.
FORMS = {
    "image only": (IMAGE, None),
    "every field": (
        IMAGE,
        {"top_k": "5", "target": "image", "collection": "shapes", "filters": '{"a": 1}'},
    ),
    "no image": (None, {"collection": "shapes"}),
    "image as a text field": (None, {"image": "not a file"}),
    "top_k 0": (IMAGE, {"top_k": "0"}),
    "top_k 101": (IMAGE, {"top_k": "101"}),
    "top_k not a number": (IMAGE, {"top_k": "ten"}),
    "top_k empty": (IMAGE, {"top_k": ""}),
    "unknown target": (IMAGE, {"target": "audio"}),
    "bad collection name": (IMAGE, {"collection": "Not A Name"}),
    "several bad fields": (None, {"top_k": "-1", "target": "x", "collection": "?"}),
    "a field twice": (IMAGE, {"top_k": ["3", "4"]}),
    "unknown fields": (IMAGE, {"colour": "red"}),
}


@pytest.mark.parametrize(("files", "data"), FORMS.values(), ids=FORMS.keys())
async def test_the_form_reads_as_fastapi_reads_it(files: Any, data: Any) -> None:
    body, content_type = _encoded(files=files, data=data)
    if files is None:  # httpx sends a form without files url-encoded: make it multipart
        body, content_type = _encoded(files={"_": (None, b"")}, data=data)
    expected = REFERENCE.post("/fastapi", content=body, headers={"content-type": content_type})
    try:
        query = await _read(body, content_type)
    except RequestValidationError as exc:
        assert expected.status_code == 422, expected.text
        reference = [(kind, tuple(loc), msg) for kind, loc, msg in expected.json()["errors"]]
        assert _summary(exc.errors()) == reference
        return
    assert expected.status_code == 200, expected.text
    assert query.fields.model_dump() == expected.json()
    assert (query.image.filename, query.image.content_type, query.image.data) == (
        "query.png",
        "image/png",
        PNG,
    )


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"top_k": 3}', "application/json"),
        (b"top_k=3", "application/x-www-form-urlencoded"),
        (b"", ""),
    ],
    ids=["json", "urlencoded", "no body"],
)
async def test_a_body_that_is_not_multipart_misses_the_image(
    body: bytes, content_type: str
) -> None:
    with pytest.raises(RequestValidationError) as raised:
        await _read(body, content_type)
    assert ("missing", ("body", "image"), "Field required") in _summary(raised.value.errors())


async def test_a_multipart_body_that_does_not_parse_is_400() -> None:
    body, content_type = _encoded(files=IMAGE)
    with pytest.raises(BadRequest):
        await _read(body, "multipart/form-data")  # no boundary
    with pytest.raises(BadRequest):
        await _read(b"--other\r\nnot a part at all", content_type)


async def test_more_parts_than_a_form_has_are_400() -> None:
    data = {"colour": [str(n) for n in range(20)]}
    body, content_type = _encoded(files=IMAGE, data=data)
    with pytest.raises(BadRequest, match="more than 16 parts"):
        await _read(body, content_type)


async def test_a_field_over_1_mib_is_400() -> None:
    body, content_type = _encoded(files=IMAGE, data={"filters": " " * (1024 * 1024 + 1)})
    with pytest.raises(BadRequest, match="larger than 1 MiB"):
        await _read(body, content_type)


async def test_the_image_part_keeps_the_upload_checks() -> None:
    body, content_type = _encoded(files={"image": ("a.gif", b"GIF89a" + PNG, "image/gif")})
    with pytest.raises(UnsupportedMediaType):
        await _read(body, content_type)
    body, content_type = _encoded(files={"image": ("big.png", PNG * 200, "image/png")})
    with pytest.raises(PayloadTooLarge):
        await _read(body, content_type)
