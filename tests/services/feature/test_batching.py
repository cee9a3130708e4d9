"""Cross-request batching through the HTTP app: concurrent requests share forward passes and get
the vectors they would have got alone; a full queue answers 503 with Retry-After."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI
from PIL import Image

from crossmodal.demo.shapes import concepts, render
from services.feature.app import create_app
from services.feature.model import PreparedImage, TransformersEmbedder
from services.feature.settings import FeatureSettings
from tests.service_tokens import KEYS, service_headers

Scenario = Callable[[FastAPI, httpx.AsyncClient], Awaitable[Any]]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def serve(settings: FeatureSettings, embedder: Any, scenario: Scenario) -> Any:
    """Run ``scenario`` against the app in one event loop, lifespan included, so that its
    requests really are concurrent."""

    async def main() -> Any:
        app = create_app(settings, embedder=embedder, token_keys=KEYS)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://feature", headers=service_headers("feature")
            ) as client:
                return await scenario(app, client)

    return asyncio.run(main())


def settings(**overrides: Any) -> FeatureSettings:
    base = {"model": "unused", "device": "cpu", "max_batch_size": 16, "max_wait_ms": 100.0}
    return FeatureSettings(**{**base, **overrides})


def test_concurrent_requests_are_merged_and_unchanged(
    demo_embedder: TransformersEmbedder,
) -> None:
    pairs = concepts()[:12]
    images = [render(colour, shape) for colour, shape in pairs]
    texts = [f"a {colour} {shape}" for colour, shape in pairs]

    async def scenario(app: FastAPI, client: httpx.AsyncClient) -> tuple[Any, ...]:
        image_calls = [
            client.post("/embed/image", files=[("images", ("i.png", png(i), "image/png"))])
            for i in images
        ]
        text_calls = [client.post("/embed/text", json={"texts": [t]}) for t in texts]
        responses = await asyncio.gather(*image_calls, *text_calls)
        service = app.state.feature.service
        return responses, service.images.batches, service.texts.batches

    responses, image_passes, text_passes = serve(settings(), demo_embedder, scenario)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    # 12 requests of each kind, far fewer forward passes.
    assert 1 <= image_passes < 6 and 1 <= text_passes < 6
    got_images = np.array([r.json()["vectors"][0] for r in responses[:12]], dtype=np.float32)
    got_texts = np.array([r.json()["vectors"][0] for r in responses[12:]], dtype=np.float32)
    # The same vectors as one input at a time through the model directly.
    alone_images = np.concatenate([demo_embedder.embed_images([i]) for i in images])
    alone_texts = np.concatenate([demo_embedder.embed_texts([t]).vectors for t in texts])
    np.testing.assert_allclose(got_images, alone_images, atol=1e-5)
    np.testing.assert_allclose(got_texts, alone_texts, atol=1e-5)
    assert not np.allclose(got_images[0], got_images[1], atol=1e-3)


def test_a_large_request_is_split_over_passes_in_order(demo_embedder: TransformersEmbedder) -> None:
    images = [render(colour, shape) for colour, shape in concepts()[:8]]
    files = [("images", (f"{k}.png", png(i), "image/png")) for k, i in enumerate(images)]

    async def scenario(app: FastAPI, client: httpx.AsyncClient) -> tuple[Any, int]:
        response = await client.post("/embed/image", files=files)
        return response, app.state.feature.service.images.batches

    response, passes = serve(settings(max_batch_size=3, max_wait_ms=0.0), demo_embedder, scenario)
    assert response.status_code == 200 and passes == 3  # 3 + 3 + 2
    np.testing.assert_allclose(
        np.asarray(response.json()["vectors"]), demo_embedder.embed_images(images), atol=1e-5
    )


class GatedEmbedder:
    """The demo model, but each image forward pass waits for ``gate``: a way to hold a
    request in flight while the queue fills."""

    def __init__(self, inner: TransformersEmbedder) -> None:
        self._inner = inner
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def embed_prepared(self, images: Sequence[PreparedImage]) -> list[Any]:
        self.entered.set()
        self.gate.wait(10)
        return self._inner.embed_prepared(images)


def test_a_full_queue_answers_503_with_retry_after(demo_embedder: TransformersEmbedder) -> None:
    gated = GatedEmbedder(demo_embedder)
    blob = png(render("red", "circle"))
    two = [("images", (f"{k}.png", blob, "image/png")) for k in range(2)]
    one = two[:1]

    async def scenario(app: FastAPI, client: httpx.AsyncClient) -> tuple[Any, ...]:
        held = asyncio.ensure_future(client.post("/embed/image", files=two))
        await asyncio.get_running_loop().run_in_executor(None, gated.entered.wait, 10)
        refused = await client.post("/embed/image", files=one)
        # Texts have their own queue: they are not refused because images are queued.
        text = asyncio.ensure_future(client.post("/embed/text", json={"texts": ["a red circle"]}))
        metrics = (await client.get("/metrics")).text
        gated.gate.set()
        done = await held
        again = await client.post("/embed/image", files=one)
        return refused, done, again, await text, metrics

    refused, done, again, text, metrics = serve(
        settings(max_queue=2, max_batch=2, max_texts=2, max_wait_ms=0.0), gated, scenario
    )
    assert refused.status_code == 503, refused.text
    body = refused.json()
    assert body["code"] == "overloaded" and "queue is full" in body["detail"]
    assert int(refused.headers["retry-after"]) >= 1
    assert 'feature_admitted_inputs{modality="image"} 2.0' in metrics
    assert done.status_code == 200 and again.status_code == 200 and text.status_code == 200


def test_not_ready_until_warm(demo_embedder: TransformersEmbedder) -> None:
    class Cold(GatedEmbedder):
        ready = False

    async def scenario(app: FastAPI, client: httpx.AsyncClient) -> tuple[Any, ...]:
        return (
            await client.get("/readyz"),
            await client.post("/embed/text", json={"texts": ["x"]}),
            await client.get("/model"),
        )

    cold = Cold(demo_embedder)
    readyz, text, model = serve(settings(), cold, scenario)
    assert readyz.status_code == 503 and "warming up" in readyz.json()["detail"]
    assert text.status_code == 503 and text.json()["code"] == "model_not_ready"
    assert model.status_code == 503
