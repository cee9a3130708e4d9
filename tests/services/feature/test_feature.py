"""The feature service in-process: contract, image safety, decoding of every mode, metrics."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from httpx import Response
from PIL import Image
from prometheus_client import REGISTRY

from crossmodal.demo.shapes import demo_collection, render
from services.feature.app import create_app
from services.feature.images import decode_image
from services.feature.metrics import observe_batch
from services.feature.model import ModelLoadError, TransformersEmbedder, default_model_id
from services.feature.settings import FeatureSettings
from shared.contracts.feature import ImageEmbeddings, TextEmbeddings

MODEL_ID = "demo-tiny-clip"
MAX_IMAGE_BYTES = 256 * 1024
PROBLEM = "application/problem+json"


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def post_images(client: TestClient, *blobs: bytes) -> Response:
    files = [
        ("images", (f"image{i}", blob, "application/octet-stream")) for i, blob in enumerate(blobs)
    ]
    return client.post("/embed/image", files=files)


def image_vectors(client: TestClient, *blobs: bytes) -> np.ndarray:
    response = post_images(client, *blobs)
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["vectors"], dtype=np.float32)


def text_vectors(client: TestClient, *texts: str) -> np.ndarray:
    response = client.post("/embed/text", json={"texts": list(texts)})
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["vectors"], dtype=np.float32)


def assert_problem(response: Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["code"] == code and body["status"] == status
    assert {"type", "title", "detail", "instance"} <= body.keys()
    return body


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG that claims ``width`` x ``height`` pixels: a decompression-bomb probe."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


# --- lifecycle and model info ------------------------------------------------------------


def test_ready_after_load(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 200 and response.json() == {"status": "ready"}


def test_not_ready_before_the_model_is_loaded(feature_settings: FeatureSettings) -> None:
    app = create_app(feature_settings)
    unstarted = TestClient(app)  # no context manager: the lifespan (model load) never runs
    assert_problem(unstarted.get("/readyz"), 503, "not_ready")


def test_model_info(client: TestClient, demo_model_dir: Path) -> None:
    info = client.get("/model").json()
    assert info == {
        "model_id": MODEL_ID,
        "dim": 32,
        "image_size": 32,
        "max_text_tokens": 32,
        "device": "cpu",
        "dtype": "float32",
        "runtime": "torch",
        "architecture": "CLIPModel",
        "fallbacks": {},
    }


# --- texts -------------------------------------------------------------------------------


def test_embed_text(client: TestClient) -> None:
    response = client.post(
        "/embed/text",
        json={"texts": ["a red circle", "a blue star"]},
        headers={"X-Request-ID": "t-1"},
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "t-1"
    body = response.json()
    assert body["model_id"] == MODEL_ID and body["dim"] == 32
    assert body["truncated"] == [False, False]
    vectors = np.asarray(body["vectors"], dtype=np.float32)
    assert vectors.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])


def test_long_text_is_truncated_and_flagged(client: TestClient) -> None:
    huge = "red circle " * 100_000  # a megabyte: cut before tokenising, still answered
    body = client.post("/embed/text", json={"texts": ["word " * 100, "a red circle", huge]}).json()
    assert body["truncated"] == [True, False, True]
    np.testing.assert_allclose(np.linalg.norm(body["vectors"], axis=1), 1.0, atol=1e-5)


def test_blank_text_is_a_problem(client: TestClient) -> None:
    body = assert_problem(
        client.post("/embed/text", json={"texts": ["fine", " \t\n", ""]}), 422, "blank_text"
    )
    assert "texts[1]" in body["detail"]
    assert [e["loc"] for e in body["errors"]] == [["body", "texts", "1"], ["body", "texts", "2"]]


def test_text_request_validation(client: TestClient) -> None:
    assert_problem(client.post("/embed/text", json={"texts": []}), 422, "validation_error")
    assert_problem(client.post("/embed/text", json={}), 422, "validation_error")
    assert_problem(
        client.post("/embed/text", json={"texts": "a red circle"}), 422, "validation_error"
    )
    assert_problem(client.post("/embed/text", json={"texts": ["x"] * 17}), 422, "too_many_texts")


def test_service_vectors_align_text_and_images(client: TestClient) -> None:
    items = demo_collection()
    # Batches of 8: the fixture's max_batch.
    images = np.concatenate(
        [
            image_vectors(client, *(encode(i.image) for i in items[k : k + 8]))
            for k in range(0, 32, 8)
        ]
    )
    query = text_vectors(client, "a red circle")[0]
    assert items[int(np.argmax(images @ query))].caption == "a red circle"
    # Image → text over every caption (batches of 16: the fixture's max_texts).
    captions = np.concatenate(
        [text_vectors(client, *(i.caption for i in items[k : k + 16])) for k in (0, 16)]
    )
    blue_star = next(k for k, i in enumerate(items) if i.caption == "a blue star")
    assert int(np.argmax(captions @ images[blue_star])) == blue_star


# --- images: contract and limits ---------------------------------------------------------


def test_embed_images_batch(client: TestClient) -> None:
    blobs = [encode(render("red", "circle")), encode(render("green", "square"), "JPEG")]
    body = post_images(client, *blobs).json()
    assert body["model_id"] == MODEL_ID and body["dim"] == 32
    vectors = np.asarray(body["vectors"], dtype=np.float32)
    assert vectors.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "blob",
    [b"definitely not an image", encode(render("red", "circle"))[:200], b""],
    ids=["garbage", "truncated-png", "empty"],
)
def test_undecodable_image_is_422(client: TestClient, blob: bytes) -> None:
    good = encode(render("red", "circle"))
    body = assert_problem(post_images(client, good, blob), 422, "invalid_image")
    assert "images[1]" in body["detail"]


def test_oversized_image_is_413(client: TestClient) -> None:
    assert_problem(post_images(client, b"\x00" * (MAX_IMAGE_BYTES + 1)), 413, "image_too_large")


@pytest.mark.parametrize("size", [(10_000, 5_000), (100_000, 100_000)], ids=["50MP", "10GP"])
def test_decompression_bomb_is_413(client: TestClient, size: tuple[int, int]) -> None:
    blob = png_header(*size)
    assert len(blob) < 200
    assert_problem(post_images(client, blob), 413, "image_too_large")


def test_vectors_as_base64_are_the_same_float32_values(client: TestClient) -> None:
    """What the services use among themselves: float32 rows in base64 instead of float lists,
    the same numbers bit for bit (JSON's shortest repr of a float32 round-trips exactly)."""
    texts = ["a red circle", "a blue star"]
    body = client.post("/embed/text", json={"texts": texts, "encoding": "base64"}).json()
    assert "vectors" not in body and body["truncated"] == [False, False]
    parsed = TextEmbeddings.model_validate(body)
    np.testing.assert_array_equal(parsed.matrix(), text_vectors(client, *texts))
    blob = encode(render("red", "circle"))
    files = [("images", ("a.png", blob, "image/png"))]
    answer = client.post("/embed/image", files=files, data={"encoding": "base64"}).json()
    assert "vectors" not in answer
    decoded = ImageEmbeddings.model_validate(answer).matrix()
    assert decoded.shape == (1, answer["dim"])
    np.testing.assert_array_equal(decoded, image_vectors(client, blob))
    assert_problem(
        client.post("/embed/text", json={"texts": texts, "encoding": "hex"}),
        422,
        "validation_error",
    )


def test_image_request_validation(client: TestClient) -> None:
    blob = encode(render("red", "circle"))
    assert_problem(post_images(client, *[blob] * 9), 422, "too_many_images")
    assert_problem(
        client.post("/embed/image", files={"other": ("a", blob)}), 422, "validation_error"
    )


# --- images: every mode decodes ----------------------------------------------------------


def _rgba() -> bytes:
    return encode(render("red", "circle").convert("RGBA"))


def _palette_transparent() -> bytes:
    image = render("red", "circle").convert("P")
    return encode(image, transparency=image.getpixel((0, 0)))


def _animated_gif() -> bytes:
    frames = [render("red", "circle"), render("blue", "square")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _array_image(dtype: str, scale: float) -> Image.Image:
    grey = np.asarray(render("red", "circle").convert("L"), dtype=np.float64) * scale
    return Image.fromarray(grey.astype(dtype))


MODES: dict[str, Callable[[], bytes]] = {
    "rgb-png": lambda: encode(render("red", "circle")),
    "rgb-jpeg": lambda: encode(render("red", "circle"), "JPEG", quality=90),
    "rgba": _rgba,
    "la": lambda: encode(render("red", "circle").convert("LA")),
    "p": lambda: encode(render("red", "circle").convert("P")),
    "p-transparent": _palette_transparent,
    "l": lambda: encode(render("red", "circle").convert("L")),
    "1-bit": lambda: encode(render("red", "circle").convert("1")),
    "cmyk-jpeg": lambda: encode(render("red", "circle").convert("CMYK"), "JPEG"),
    "16-bit-png": lambda: encode(_array_image("uint16", 257)),
    "32-bit-int-tiff": lambda: encode(_array_image("int32", 257), "TIFF"),
    "float-tiff": lambda: encode(_array_image("float32", 1 / 255), "TIFF"),
    "animated-gif": _animated_gif,
    "webp": lambda: encode(render("red", "circle"), "WEBP", lossless=True),
    "bmp": lambda: encode(render("red", "circle"), "BMP"),
    "cmyk-tiff": lambda: encode(render("red", "circle").convert("CMYK"), "TIFF"),
    "lab-tiff": lambda: encode(render("red", "circle").convert("LAB"), "TIFF"),
    "ycbcr-tiff": lambda: encode(render("red", "circle").convert("YCbCr"), "TIFF"),
    "animated-png": lambda: encode(
        render("red", "circle"), "PNG", save_all=True, append_images=[render("blue", "square")]
    ),
    "animated-webp": lambda: encode(
        render("red", "circle"), "WEBP", save_all=True, append_images=[render("blue", "square")]
    ),
}


@pytest.mark.parametrize("make", MODES.values(), ids=MODES.keys())
def test_every_image_mode_embeds(client: TestClient, make: Callable[[], bytes]) -> None:
    vectors = image_vectors(client, make())
    assert vectors.shape == (1, 32)
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_transparency_is_flattened_onto_white(client: TestClient) -> None:
    upright = render("red", "circle")
    pixels = np.asarray(upright)
    alpha = np.where((pixels == 255).all(axis=2), 0, 255).astype(np.uint8)
    # Transparent pixels are black underneath: a naive RGB conversion would show black.
    rgb = np.where(alpha[..., None] == 0, 0, pixels).astype(np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, alpha]))
    expected, got, naive = image_vectors(
        client, encode(upright), encode(rgba), encode(rgba.convert("RGB"))
    )
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.allclose(naive, expected, atol=1e-3)


def test_16_bit_greyscale_is_scaled_not_clipped(client: TestClient) -> None:
    eight, sixteen = image_vectors(
        client, encode(_array_image("uint8", 1)), encode(_array_image("uint16", 257))
    )
    np.testing.assert_allclose(sixteen, eight, atol=1e-5)


def test_animated_gif_uses_the_first_frame(client: TestClient) -> None:
    gif, red, blue = image_vectors(
        client, _animated_gif(), encode(render("red", "circle")), encode(render("blue", "square"))
    )
    assert gif @ red > 0.99 and gif @ red > gif @ blue


def test_draft_decoding_keeps_the_vector(demo_embedder: TransformersEmbedder) -> None:
    rng = np.random.default_rng(0)
    noisy = np.asarray(render("red", "star", size=1024), dtype=np.float64)
    noisy = noisy + rng.normal(0, 8, noisy.shape)  # texture, so the DCT scale matters
    blob = encode(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), "JPEG", quality=90)
    full = decode_image(blob, max_bytes=len(blob), max_pixels=1 << 24)
    drafted = decode_image(
        blob, max_bytes=len(blob), max_pixels=1 << 24, draft=demo_embedder.draft_size
    )
    assert drafted.size == (128, 128) and full.size == (1024, 1024)  # 1/8: still >= 2 x 32
    a, b = demo_embedder.embed_images([full, drafted])
    assert a @ b > 0.999


def test_exif_orientation_survives_draft_decoding(client: TestClient) -> None:
    # 1024 px for a 32 px model: the JPEG is decoded at 1/8 scale, then turned upright.
    upright = render("red", "triangle", size=1024)
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    expected, got, ignored = image_vectors(
        client,
        encode(upright, "JPEG", quality=95),
        encode(stored, "JPEG", quality=95, exif=exif),
        encode(stored, "JPEG", quality=95),
    )
    assert got @ expected > 0.999
    assert not np.allclose(ignored, expected, atol=1e-3)


def test_exif_orientation_is_applied(client: TestClient) -> None:
    upright = render("red", "triangle")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # how a sideways camera stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    expected, got, ignored = image_vectors(
        client, encode(upright), encode(stored, exif=exif), encode(stored)
    )
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.allclose(ignored, expected, atol=1e-3)


# --- metrics, settings, loading ------------------------------------------------------------


def test_metrics(client: TestClient) -> None:
    text_vectors(client, "a red circle")
    image_vectors(client, encode(render("red", "circle")))
    metrics = client.get("/metrics").text
    gauge = next(
        line for line in metrics.splitlines() if line.startswith("multimodal_model_inference_ms ")
    )
    assert float(gauge.split()[1]) > 0
    assert 'feature_inference_seconds_count{modality="text"}' in metrics
    assert 'feature_inference_seconds_count{modality="image"}' in metrics
    assert 'feature_batch_size_bucket{le="1.0",modality="image"}' in metrics
    # Nothing is waiting once the answers are in.
    assert 'feature_queue_depth{modality="image"} 0.0' in metrics
    assert 'feature_admitted_inputs{modality="text"} 0.0' in metrics


def test_inference_time_is_counted_once_per_input() -> None:
    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, {"modality": "text", **labels}) or 0.0

    names = {
        "count": ("feature_input_inference_seconds_count", {}),
        "sum": ("feature_input_inference_seconds_sum", {}),
        "le 0.25": ("feature_input_inference_seconds_bucket", {"le": "0.25"}),
        "le 0.5": ("feature_input_inference_seconds_bucket", {"le": "0.5"}),
        "passes": ("feature_inference_seconds_count", {}),
    }
    before = {key: sample(name, **labels) for key, (name, labels) in names.items()}
    observe_batch("text", 5, 0.3)  # one pass of 0.3 s over 5 inputs
    grown = {key: sample(name, **labels) - before[key] for key, (name, labels) in names.items()}
    assert grown == pytest.approx({"count": 5, "sum": 1.5, "le 0.25": 0, "le 0.5": 5, "passes": 1})


def metric_value(client: TestClient, prefix: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.split()[-1])
    return 0.0


def test_errors_are_counted_by_code(client: TestClient) -> None:
    blank = 'feature_errors_total{code="blank_text",endpoint="/embed/text"}'
    invalid = 'feature_errors_total{code="validation_error",endpoint="/embed/text"}'
    before = metric_value(client, blank), metric_value(client, invalid)
    client.post("/embed/text", json={"texts": [" "]})
    client.post("/embed/text", json={"texts": [" "]})
    client.post("/embed/text", json={"texts": []})
    assert metric_value(client, blank) == before[0] + 2
    assert metric_value(client, invalid) == before[1] + 1


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = FeatureSettings()
    assert defaults.port == 8002 and defaults.model == "var/demo/model"
    assert defaults.model_id is None
    assert (defaults.torch_threads, defaults.max_batch, defaults.max_texts) == (2, 64, 256)
    assert (defaults.runtime, defaults.decode_threads) == ("auto", 2)
    assert (defaults.max_batch_size, defaults.max_wait_ms, defaults.max_queue) == (32, 5.0, 512)
    assert defaults.max_image_bytes == 20 * 1024 * 1024 and defaults.max_image_pixels == 40_000_000
    monkeypatch.setenv("FEATURE_PORT", "9102")
    monkeypatch.setenv("FEATURE_MODEL", "openai/clip-vit-base-patch32")
    monkeypatch.setenv("FEATURE_MODEL_ID", "clip-b32")
    monkeypatch.setenv("FEATURE_DEVICE", "cpu")
    monkeypatch.setenv("FEATURE_RUNTIME", "onnx")
    monkeypatch.setenv("FEATURE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("FEATURE_MAX_WAIT_MS", "2.5")
    settings = FeatureSettings()
    assert settings.port == 9102 and settings.device == "cpu"
    assert settings.model_id == "clip-b32" and settings.runtime == "onnx"
    assert (settings.max_batch_size, settings.max_wait_ms) == (8, 2.5)


def test_queue_must_hold_one_request() -> None:
    with pytest.raises(ValueError, match="max_queue"):
        FeatureSettings(max_queue=100, max_batch=64, max_texts=256)
    assert FeatureSettings(max_queue=64, max_batch=64, max_texts=64).max_queue == 64


def test_default_model_id_follows_the_weights_not_the_path(
    tmp_path: Path, random_model_dir: Path, demo_model_dir: Path
) -> None:
    assert default_model_id("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"
    copy = tmp_path / "model"
    shutil.copytree(random_model_dir, copy)
    assert default_model_id(str(copy)) == default_model_id(str(random_model_dir))
    assert default_model_id(str(copy)).startswith("model@")
    assert default_model_id(str(demo_model_dir)) != default_model_id(str(random_model_dir))


def test_unloadable_models_fail_loudly(tmp_path: Path, random_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="build-model"):
        TransformersEmbedder.load(str(tmp_path / "var" / "missing"))
    # transformers 5 quietly builds a 2-token tokenizer when the tokenizer files are missing.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        shutil.copy(random_model_dir / name, bare / name)
    with pytest.raises(ModelLoadError, match="tokenizer"):
        TransformersEmbedder.load(str(bare))
