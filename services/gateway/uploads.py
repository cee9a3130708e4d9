"""Upload checks at the door: the declared media type must be one of the allowed image types,
the bytes must not be a known image format outside that list, and the size must fit. Decoding
and the pixel limits stay with the feature and metadata services (``shared.images``)."""

from __future__ import annotations

from fastapi import UploadFile

from services.gateway.orchestrator import Upload
from shared.problems import PayloadTooLarge, Unprocessable, UnsupportedMediaType

_CHUNK = 1024 * 1024

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
    content_type = (upload.content_type or "").split(";")[0].strip().lower()
    content_type = _ALIASES.get(content_type, content_type)
    if content_type not in allowed_types:
        raise UnsupportedMediaType(
            f"the upload must be one of {', '.join(allowed_types)}, "
            f"not {content_type or 'untyped data'}",
            code="unsupported_media_type",
        )
    chunks: list[bytes] = []
    size = 0
    while chunk := await upload.read(_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(
                f"the image is larger than {max_bytes} bytes", code="image_too_large"
            )
        chunks.append(chunk)
    if size == 0:
        raise Unprocessable("the image is empty", code="invalid_image")
    data = b"".join(chunks)
    sniffed = sniff_image_type(data)
    # A mislabelled upload of an allowed format is fine (the format is detected downstream);
    # bytes of a format the configuration does not allow are not, whatever their label says.
    if sniffed is not None and sniffed not in allowed_types:
        raise UnsupportedMediaType(
            f"the upload is {sniffed}, which is not accepted", code="unsupported_media_type"
        )
    return Upload(upload.filename or "upload", content_type, data)
