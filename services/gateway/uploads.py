"""Upload checks at the door: the declared media type must be one of the allowed image types,
the bytes must not be a known image format outside that list, and the size must fit. Decoding
and the pixel limits stay with the feature and metadata services (``shared.images``).

``read_image_search_form`` reads the form of ``POST /search/image`` from the raw body with
python-multipart's parser directly: Starlette's form parsing (a spooled temporary file per
upload, then FastAPI's field-by-field validation) took about twice its CPU, on the path of every
image search, cached or not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request, UploadFile
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from services.gateway.orchestrator import Upload
from services.gateway.schemas import ImageSearchFields
from shared.problems import BadRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType

# Labels clients commonly send for the same formats.
_ALIASES = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "image/x-png": "image/png",
    "image/x-ms-bmp": "image/bmp",
    "image/x-bmp": "image/bmp",
    "image/tif": "image/tiff",
}

# Magic numbers of the image formats an allow-list can name.
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"GIF87a", 0, "image/gif"),
    (b"GIF89a", 0, "image/gif"),
    (b"WEBP", 8, "image/webp"),
    (b"BM", 0, "image/bmp"),
    (b"II*\x00", 0, "image/tiff"),
    (b"MM\x00*", 0, "image/tiff"),
    (b"ftypavif", 4, "image/avif"),
)


def sniff_image_type(data: bytes) -> str | None:
    """The image media type the bytes announce, or None when they match no known format."""
    for magic, offset, media_type in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            if media_type == "image/webp" and not data.startswith(b"RIFF"):
                continue
            return media_type
    return None


async def read_upload(upload: UploadFile, max_bytes: int, allowed_types: tuple[str, ...]) -> Upload:
    # The whole file: the request body limit (BodySizeLimitMiddleware) already bounds it.
    return check_upload(
        upload.filename, upload.content_type, await upload.read(), max_bytes, allowed_types
    )


def _check_type(declared: str | None, allowed_types: tuple[str, ...]) -> str:
    content_type = (declared or "").split(";")[0].strip().lower()
    content_type = _ALIASES.get(content_type, content_type)
    if content_type not in allowed_types:
        raise UnsupportedMediaType(
            f"the upload must be one of {', '.join(allowed_types)}, "
            f"not {content_type or 'untyped data'}",
            code="unsupported_media_type",
        )
    return content_type


def check_upload(
    filename: str | None,
    declared_type: str | None,
    data: bytes,
    max_bytes: int,
    allowed_types: tuple[str, ...],
) -> Upload:
    """The upload as the services take it, or the problem its type, size or bytes make."""
    content_type = _check_type(declared_type, allowed_types)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"the image is larger than {max_bytes} bytes", code="image_too_large")
    if not data:
        raise Unprocessable("the image is empty", code="invalid_image")
    sniffed = sniff_image_type(data)
    # A mislabelled upload of an allowed format is fine (the format is detected downstream);
    # bytes of a format the configuration does not allow are not, whatever their label says.
    if sniffed is not None and sniffed not in allowed_types:
        raise UnsupportedMediaType(
            f"the upload is {sniffed}, which is not accepted", code="unsupported_media_type"
        )
    return Upload(filename or "upload", content_type, data)


# More parts than the form has fields is not a search: refused before any is looked at.
_MAX_PARTS = 16
# A field that is not a file, at most (Starlette's limit, which the other forms keep).
_MAX_FIELD_BYTES = 1024 * 1024


@dataclass
class _Part:
    name: str | None = None
    filename: str | None = None
    content_type: str | None = None
    data: bytes = b""


@dataclass(frozen=True)
class ImageQuery:
    """A parsed ``POST /search/image`` form."""

    image: Upload
    fields: ImageSearchFields


def _parse_parts(body: bytes, boundary: bytes) -> list[_Part]:
    parts: list[_Part] = []
    chunks: list[bytes] = []
    field = bytearray()
    value = bytearray()

    def on_part_begin() -> None:
        if len(parts) >= _MAX_PARTS:
            raise BadRequest(f"the form has more than {_MAX_PARTS} parts", code="bad_request")
        parts.append(_Part())
        chunks.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        value.extend(data[start:end])

    def on_header_end() -> None:
        name = bytes(field).lower()
        if name == b"content-disposition":
            _, options = parse_options_header(bytes(value))
            part_name, filename = options.get(b"name"), options.get(b"filename")
            parts[-1].name = None if part_name is None else part_name.decode("utf-8", "replace")
            parts[-1].filename = None if filename is None else filename.decode("utf-8", "replace")
        elif name == b"content-type":
            parts[-1].content_type = bytes(value).decode("latin-1")
        field.clear()
        value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunks.append(data[start:end])

    def on_part_end() -> None:
        part = parts[-1]
        part.data = b"".join(chunks)
        if part.filename is None and len(part.data) > _MAX_FIELD_BYTES:
            raise BadRequest(
                f"the form field {part.name!r} is larger than 1 MiB", code="bad_request"
            )

    callbacks: Any = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    parser = MultipartParser(boundary, callbacks)
    parser.write(body)
    parser.finalize()
    return parts


async def read_image_search_form(
    request: Request, max_bytes: int, allowed_types: tuple[str, ...]
) -> ImageQuery:
    """The ``image`` part and the other fields of a multipart search form, with the answers
    FastAPI's own form handling gives: 400 for a body that does not parse, 422
    ``validation_error`` for a missing or invalid field (a field given twice: the last one; an
    empty one: its default); any other body has no image (422)."""
    media_type, options = parse_options_header(request.headers.get("content-type", ""))
    parts: list[_Part] = []
    if media_type == b"multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise BadRequest("the multipart body has no boundary", code="bad_request")
        try:
            parts = _parse_parts(await request.body(), boundary)
        except FormParserError as exc:
            raise BadRequest(
                f"the multipart body does not parse: {exc}", code="bad_request"
            ) from None
    by_name = {part.name: part for part in parts if part.name is not None}
    errors: list[dict[str, Any]] = []
    image = by_name.pop("image", None)
    if image is None:
        errors.append({"type": "missing", "loc": ("body", "image"), "msg": "Field required"})
    elif image.filename is None:
        errors.append(
            {
                "type": "value_error",
                "loc": ("body", "image"),
                "msg": "Value error, Expected UploadFile, received: <class 'str'>",
            }
        )
    # An empty field is an absent one (its default), as FastAPI reads forms.
    raw = {name: _text(part.data) for name, part in by_name.items() if part.data}
    try:
        fields = ImageSearchFields.model_validate(raw)
    except ValidationError as exc:
        errors += [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
    if errors:
        raise RequestValidationError(errors)
    assert image is not None
    upload = check_upload(image.filename, image.content_type, image.data, max_bytes, allowed_types)
    return ImageQuery(upload, fields)


def _text(data: bytes) -> str | bytes:
    # Bytes that are not UTF-8 stay bytes: validation answers "not a valid string" for them.
    try:
        return data.decode()
    except UnicodeDecodeError:
        return data
