"""inspect_image: the one gate every uploaded image passes."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from shared.images import inspect_image, served_image
from shared.problems import PayloadTooLarge, Unprocessable


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


PNG = encode(Image.new("RGB", (40, 30), "red"), "PNG")


def test_format_and_content_type_come_from_the_bytes() -> None:
    info = inspect_image(PNG, max_bytes=10**6, max_pixels=10**6)
    assert (info.format, info.width, info.height, info.content_type) == ("PNG", 40, 30, "image/png")
    jpeg = inspect_image(encode(Image.new("RGB", (8, 8)), "JPEG"), max_bytes=10**6, max_pixels=64)
    assert jpeg.content_type == "image/jpeg"


@pytest.mark.parametrize(
    ("data", "limits", "error", "code"),
    [
        (PNG, {"max_bytes": len(PNG) - 1, "max_pixels": 10**6}, PayloadTooLarge, "image_too_large"),
        (PNG, {"max_bytes": 10**6, "max_pixels": 40 * 30 - 1}, PayloadTooLarge, "image_too_large"),
        (b"", {"max_bytes": 10**6, "max_pixels": 10**6}, Unprocessable, "invalid_image"),
        (b"hello world", {"max_bytes": 10**6, "max_pixels": 10**6}, Unprocessable, "invalid_image"),
        (PNG[:60], {"max_bytes": 10**6, "max_pixels": 10**6}, Unprocessable, "invalid_image"),
        (
            b"%!PS-Adobe-3.0 EPSF-3.0\n",
            {"max_bytes": 10**6, "max_pixels": 10**6},
            Unprocessable,
            "invalid_image",
        ),
    ],
)
def test_refusals(data: bytes, limits: dict, error: type, code: str) -> None:
    with pytest.raises(error) as raised:
        inspect_image(data, **limits)
    assert raised.value.code == code


def test_corrupted_png_checksum_is_refused() -> None:
    broken = bytearray(PNG)
    idat = broken.index(b"IDAT")
    broken[idat + 6] ^= 0xFF  # flip a compressed byte: the chunk CRC no longer matches
    with pytest.raises(Unprocessable):
        inspect_image(bytes(broken), max_bytes=10**6, max_pixels=10**6)


def test_a_header_claiming_gigapixels_is_refused_before_decoding() -> None:
    bomb = encode(Image.new("1", (20000, 20000)), "PNG")  # ~50 KB on disk, 400 Mpx decoded
    assert len(bomb) < 200_000
    with pytest.raises(PayloadTooLarge):
        inspect_image(bomb, max_bytes=10**6, max_pixels=40_000_000)


@pytest.mark.parametrize(
    ("stored", "media_type", "disposition"),
    [
        ("image/png", "image/png", 'inline; filename="item-7.png"'),
        ("image/jpeg", "image/jpeg", 'inline; filename="item-7.jpg"'),
        ("image/mpo", "image/jpeg", 'inline; filename="item-7.jpg"'),
        ("IMAGE/AVIF; x=1", "image/avif", 'inline; filename="item-7.avif"'),
        # Never a type a browser would render as a page or run, whatever a row says.
        ("text/html", "application/octet-stream", 'attachment; filename="item-7.bin"'),
        ("image/svg+xml", "application/octet-stream", 'attachment; filename="item-7.bin"'),
        ("application/zip", "application/octet-stream", 'attachment; filename="item-7.bin"'),
        ("", "application/octet-stream", 'attachment; filename="item-7.bin"'),
    ],
)
def test_stored_images_are_served_as_images_or_downloads(
    stored: str, media_type: str, disposition: str
) -> None:
    served = served_image(stored, "item-7")
    assert served.media_type == media_type
    assert served.headers == {
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
        "Content-Disposition": disposition,
    }


def test_the_served_file_name_cannot_break_out_of_its_header() -> None:
    disposition = served_image("image/png", 'a"; filename=x.html\r\nX: y/../').headers[
        "Content-Disposition"
    ]
    assert disposition == 'inline; filename="a___filename_x.html__X__y_.._.png"'
