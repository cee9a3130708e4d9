"""What comes back out of an upload, through the gateway and every service a real process: a
stored image is served so that no browser runs it, and only followable links are kept as its
origin."""

from __future__ import annotations

import io
import random
import zipfile
from typing import Any

import httpx
from PIL import Image

from crossmodal.demo.shapes import render
from tests.integration.support import assert_problem

COLLECTION = "hygiene"


def upload(
    gateway: httpx.Client, auth: dict[str, str], image: bytes, **fields: Any
) -> httpx.Response:
    return gateway.post(
        "/items",
        headers=auth,
        data={"collection": COLLECTION, **fields},
        # The client's claim: a web page. The bytes decide what the item is.
        files={"image": ("page.html", image, "text/html")},
    )


def jpeg_zip_polyglot() -> bytes:
    picture = io.BytesIO()
    render("purple", "circle", rng=random.Random(7)).save(picture, format="JPEG")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("index.html", "<script>alert(document.domain)</script>")
    return picture.getvalue() + archive.getvalue()


def test_a_polyglot_upload_is_served_back_as_an_image_no_browser_runs(
    gateway: httpx.Client, auth: dict[str, str]
) -> None:
    polyglot = jpeg_zip_polyglot()
    response = gateway.post(
        "/items",
        headers=auth,
        data={"collection": COLLECTION, "caption": ["a purple circle"]},
        files={"image": ("page.jpg", polyglot, "image/jpeg")},
    )
    assert response.status_code == 201, response.text
    item = response.json()
    assert item["content_type"] == "image/jpeg"

    original = gateway.get(f"/items/{item['id']}/image", headers=auth)
    assert original.status_code == 200
    assert original.content == polyglot  # the bytes are kept: they are what was uploaded
    assert original.headers["content-type"] == "image/jpeg"
    assert original.headers["x-content-type-options"] == "nosniff"
    assert original.headers["content-security-policy"] == "default-src 'none'; sandbox"
    assert original.headers["content-disposition"] == f'inline; filename="item-{item["id"]}.jpg"'

    thumb = gateway.get(f"/items/{item['id']}/image", headers=auth, params={"size": "thumb"})
    assert Image.open(io.BytesIO(thumb.content)).format == "JPEG"
    assert thumb.headers["x-content-type-options"] == "nosniff"
    assert thumb.headers["content-disposition"] == (
        f'inline; filename="item-{item["id"]}-thumb.jpg"'
    )


def test_an_upload_claiming_to_be_html_is_refused(
    gateway: httpx.Client, auth: dict[str, str]
) -> None:
    assert_problem(upload(gateway, auth, jpeg_zip_polyglot()), 415, "unsupported_media_type")


def test_source_uri_keeps_only_followable_links(
    gateway: httpx.Client, auth: dict[str, str]
) -> None:
    image = io.BytesIO()
    render("orange", "star", rng=random.Random(8)).save(image, format="PNG")
    for uri in ("javascript:alert(1)", "file:///etc/passwd", "data:text/html,<b>x</b>"):
        response = gateway.post(
            "/items",
            headers=auth,
            data={"collection": COLLECTION, "source_uri": uri},
            files={"image": ("a.png", image.getvalue(), "image/png")},
        )
        assert response.status_code == 422, (uri, response.text)
        assert response.json()["code"] in ("invalid_source_uri", "validation_error"), uri
    response = gateway.post(
        "/items",
        headers=auth,
        data={"collection": COLLECTION, "source_uri": "https://example.com/star.png"},
        files={"image": ("a.png", image.getvalue(), "image/png")},
    )
    assert response.status_code == 201, response.text
    assert response.json()["source_uri"] == "https://example.com/star.png"
