"""CPU per ``POST /search/image`` form read: FastAPI's own form handling of the route's
signature against ``services.gateway.uploads.read_image_search_form``, each behind a minimal
route, called in-process (no server, no network) with one multipart body of an 85 KB image.

    python -m benchmarks.image_form [--calls 3000] [--image-bytes 85000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Annotated, Any

import httpx
from fastapi import FastAPI, File, Form, Request, UploadFile

from benchmarks.middleware import scope
from services.gateway.schemas import Target
from services.gateway.uploads import read_image_search_form, read_upload
from shared.collections import COLLECTION_NAME_PATTERN

ALLOWED = ("image/jpeg", "image/png")


def form_app() -> FastAPI:
    """Two routes that read the same form and answer its fields: ``/fastapi`` by FastAPI's own
    form handling of the route's former signature, ``/raw`` by ``read_image_search_form``.
    tests/services/gateway/test_gateway_image_form.py holds the second to the first."""
    app = FastAPI()

    @app.post("/fastapi")
    async def fastapi_form(
        image: Annotated[UploadFile, File()],
        top_k: Annotated[int, Form(ge=1, le=100)] = 10,
        target: Annotated[Target, Form()] = "text",
        collection: Annotated[str, Form(pattern=COLLECTION_NAME_PATTERN)] = "demo",
        filters: Annotated[str | None, Form()] = None,
    ) -> dict[str, Any]:
        await read_upload(image, 10**7, ALLOWED)
        return {"top_k": top_k, "target": target, "collection": collection, "filters": filters}

    @app.post("/raw")
    async def raw_form(request: Request) -> dict[str, Any]:
        query = await read_image_search_form(request, 10**7, ALLOWED)
        return query.fields.model_dump()

    return app


async def _measure(app: FastAPI, path: str, body: bytes, content_type: str, calls: int) -> float:
    # The body in 64 KiB messages, as uvicorn hands it over.
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    headers = [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body))]
    request_scope = scope(headers, "POST", path)

    async def call() -> None:
        messages = iter(
            {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
            for i, chunk in enumerate(chunks)
        )

        async def receive() -> Any:
            return next(messages)

        async def send(message: Any) -> None:
            if message["type"] == "http.response.start":
                assert message["status"] == 200, message

        await app(dict(request_scope), receive, send)

    for _ in range(200):
        await call()
    started = time.process_time()
    for _ in range(calls):
        await call()
    return (time.process_time() - started) / calls * 1e6


async def _main(calls: int, image_bytes: int) -> None:
    app = form_app()
    image = b"\xff\xd8\xff" + os.urandom(image_bytes - 3)
    request = httpx.Request(
        "POST",
        "http://bench/",
        files={"image": ("query.jpg", image, "image/jpeg")},
        data={"top_k": "10", "target": "image", "collection": "bench"},
    )
    body, content_type = request.read(), request.headers["content-type"]
    for round_ in (1, 2):
        for path in ("/fastapi", "/raw"):
            micros = await _measure(app, path, body, content_type, calls)
            print(f"round {round_} {path:9s} {micros:7.1f} µs of CPU per form")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--image-bytes", type=int, default=85_000)
    args = parser.parse_args()
    asyncio.run(_main(args.calls, args.image_bytes))


if __name__ == "__main__":
    main()
