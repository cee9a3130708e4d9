"""Runtimes against fp32 PyTorch on the same inputs: cosine >= 0.999 for every vector."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from crossmodal.demo.shapes import demo_collection
from services.feature.app import create_app
from services.feature.export_onnx import main as export_main
from services.feature.model import (
    ONNX_MANIFEST,
    ModelLoadError,
    TransformersEmbedder,
    cpu_supports_bf16,
    default_model_id,
    resolve_runtime,
)
from services.feature.settings import FeatureSettings
from tests.service_tokens import KEYS, service_headers

PARITY = 0.999
TEXTS = [
    "a red circle",
    "a photo of a blue star",
    "x",
    "a very long description " * 20,  # truncated at 32 tokens
]


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.min(np.sum(a * b, axis=1)))


@pytest.fixture(scope="module")
def images() -> list:
    return [item.image for item in demo_collection()]


@pytest.fixture(scope="module")
def onnx_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "export"
    assert export_main(["--model", str(demo_model_dir), "--out", str(out)]) == 0
    return out


def test_bf16_autocast_on_cpu(
    demo_embedder: TransformersEmbedder, demo_model_dir: Path, images: list
) -> None:
    if not cpu_supports_bf16():
        with pytest.raises(ModelLoadError, match="bfloat16"):
            TransformersEmbedder.load(str(demo_model_dir), device="cpu", runtime="torch-bf16")
        pytest.skip("this CPU has no native bfloat16")
    bf16 = TransformersEmbedder.load(str(demo_model_dir), device="cpu", runtime="torch-bf16")
    assert (bf16.runtime, bf16.dtype, bf16.fallbacks) == ("torch-bf16", "bfloat16", {})
    assert min(bf16.parity.values()) >= PARITY
    assert bf16.model_id == default_model_id(str(demo_model_dir))
    image_cos = min_cosine(bf16.embed_images(images), demo_embedder.embed_images(images))
    text_cos = min_cosine(bf16.embed_texts(TEXTS).vectors, demo_embedder.embed_texts(TEXTS).vectors)
    assert image_cos >= PARITY and text_cos >= PARITY
    # Autocast really ran in bf16: the vectors are close, not identical.
    assert min(image_cos, text_cos) < 0.9999999


def test_a_bf16_tower_that_misses_the_bound_runs_in_float32(
    demo_embedder: TransformersEmbedder,
    demo_model_dir: Path,
    images: list,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The decision at load, with the outcome forced (a bound no bf16 vector can reach, and
    native bfloat16 assumed so that it runs on any processor): both towers run without
    autocast, give float32's vectors and say why."""
    import services.feature.model as model_module

    monkeypatch.setattr(model_module, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(model_module, "PARITY", 1.0)
    bf16 = TransformersEmbedder.load(str(demo_model_dir), device="cpu", runtime="torch-bf16")
    assert (bf16.runtime, bf16.dtype) == ("torch-bf16", "float32")
    assert sorted(bf16.fallbacks) == ["image", "text"]
    assert all("bfloat16 vectors reach cosine" in r for r in bf16.fallbacks.values())
    assert min_cosine(bf16.embed_images(images), demo_embedder.embed_images(images)) > 0.99999
    text = bf16.embed_texts(TEXTS).vectors
    assert min_cosine(text, demo_embedder.embed_texts(TEXTS).vectors) > 0.99999


def test_onnx_export_and_runtime(
    onnx_dir: Path, demo_model_dir: Path, demo_embedder: TransformersEmbedder, images: list
) -> None:
    from services.feature.onnx_runtime import OnnxEmbedder

    manifest = json.loads((onnx_dir / ONNX_MANIFEST).read_text())
    # The export keeps the source's id: its vectors are that model's, and may be mixed with it.
    assert manifest["model_id"] == default_model_id(str(demo_model_dir))
    assert min(manifest["parity"].values()) >= PARITY
    onnx = OnnxEmbedder.load(str(onnx_dir), threads=2)
    assert (onnx.runtime, onnx.dtype, onnx.model_id) == ("onnx", "float32", manifest["model_id"])
    # One batch with texts of very different lengths: the padding masks are honoured.
    text = onnx.embed_texts(TEXTS)
    reference = demo_embedder.embed_texts(TEXTS)
    assert text.truncated == reference.truncated == [False, False, False, True]
    assert min_cosine(text.vectors, reference.vectors) >= PARITY
    assert min_cosine(onnx.embed_images(images), demo_embedder.embed_images(images)) >= PARITY
    # Batch sizes other than the exported example's.
    assert (
        min_cosine(onnx.embed_images(images[:1]), demo_embedder.embed_images(images[:1])) >= PARITY
    )


def test_onnx_int8_export_and_runtime(
    demo_model_dir: Path,
    demo_embedder: TransformersEmbedder,
    images: list,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    import onnx
    from onnx import numpy_helper

    from services.feature.onnx_runtime import OnnxEmbedder, tower_file

    out = tmp_path_factory.mktemp("onnx-int8") / "export"
    args = ["--model", str(demo_model_dir), "--out", str(out), "--quantize", "int8"]
    assert export_main(args) == 0
    manifest = json.loads((out / ONNX_MANIFEST).read_text())
    assert manifest["weights"] == {"text": "int8", "image": "int8"}
    assert min(manifest["parity"].values()) >= PARITY
    for tower in ("text", "image"):
        graph = onnx.load(str(out / tower_file(tower, "int8"))).graph
        weights = {w.name: w for w in graph.initializer}
        ops = [node.op_type for node in graph.node]
        # Every product with a weight matrix is an integer one; the attention products of two
        # activations stay float.
        fp32_weight_products = [
            node.name
            for node in graph.node
            if node.op_type == "MatMul" and any(i in weights for i in node.input)
        ]
        assert "MatMulInteger" in ops and not fp32_weight_products, (tower, fp32_weight_products)
        # The ViT's patch embedding became an (integer) product too.
        assert "Conv" not in ops
        # 7-bit weights (|w| <= 64): the AVX2 kernel's 16-bit sums of two products stay
        # within 2 * 255 * 64 = 32,640, so every x86 processor computes the same integers.
        for node in graph.node:
            if node.op_type == "MatMulInteger":
                quantised = numpy_helper.to_array(weights[node.input[1]])
                assert quantised.dtype == np.int8
                assert np.abs(quantised.astype(np.int16)).max() <= 64, node.name
        # The float32 graph stays beside it, for a processor where int8 misses the bound.
        float32_ops = {n.op_type for n in onnx.load(str(out / tower_file(tower))).graph.node}
        assert "MatMulInteger" not in float32_ops
    int8 = OnnxEmbedder.load(str(out), threads=2)
    assert (int8.runtime, int8.dtype, int8.model_id) == ("onnx", "int8", manifest["model_id"])
    assert int8.fallbacks == {}
    image_cos = min_cosine(int8.embed_images(images), demo_embedder.embed_images(images))
    text_cos = min_cosine(int8.embed_texts(TEXTS).vectors, demo_embedder.embed_texts(TEXTS).vectors)
    assert image_cos >= PARITY and text_cos >= PARITY
    # The integer kernels really ran: close to fp32, not equal to it.
    assert min(image_cos, text_cos) < 0.99999


def test_patch_convolutions_become_products_with_the_same_output() -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from services.feature.int8 import patch_convolutions_as_products

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 3, 4, 4)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    graph = helper.make_graph(
        [
            # A patch embedding (kernel = stride) and a padded convolution, which must stay.
            helper.make_node("Conv", ["x", "w", "b"], ["patches"], strides=[4, 4]),
            helper.make_node("Conv", ["x", "w"], ["padded"], strides=[4, 4], pads=[1, 1, 1, 1]),
        ],
        "convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 12])],
        [
            helper.make_tensor_value_info("patches", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("padded", TensorProto.FLOAT, None),
        ],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((2, 3, 16, 12)).astype(np.float32)

    def run(m: onnx.ModelProto) -> list[np.ndarray]:
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})

    expected = run(model)
    assert patch_convolutions_as_products(model) == 1
    assert [n.op_type for n in model.graph.node].count("Conv") == 1
    assert "MatMul" in [n.op_type for n in model.graph.node]
    for got, want in zip(run(model), expected, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_int8_export_keeps_a_tower_that_quantises_badly_in_fp32(
    dual_encoder_model_dir: Path, tmp_path: Path
) -> None:
    """The dual encoder's pretrained MiniLM text tower has outlier activations: in int8 its
    vectors fall far below the bound, so it stays fp32 while the vision tower is quantised."""
    from services.feature.export_onnx import export
    from services.feature.onnx_runtime import OnnxEmbedder

    manifest = export(str(dual_encoder_model_dir), tmp_path / "onnx", quantize="int8")
    assert manifest["weights"] == {"text": "float32", "image": "int8"}
    assert min(manifest["parity"].values()) >= PARITY
    assert sorted(p.name for p in (tmp_path / "onnx").glob("*.onnx")) == [
        "image.int8.onnx",
        "image.onnx",
        "text.onnx",
    ]
    onnx = OnnxEmbedder.load(str(tmp_path / "onnx"), threads=1)
    assert onnx.dtype == "int8 (image), float32 (text)"
    assert onnx.fallbacks == {}


def test_an_int8_tower_that_misses_the_bound_where_it_is_served_runs_in_float32(
    dual_encoder_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The decision at load, with the outcome forced: the MiniLM text tower quantised by hand
    and offered as int8, as an export made on another machine might. The service starts, runs
    that tower from its float32 graph, says so in the log and in /model, and keeps the image
    tower in int8."""
    import logging

    from services.feature.export_onnx import export
    from services.feature.int8 import quantize_int8
    from services.feature.onnx_runtime import OnnxEmbedder, tower_file

    out = tmp_path / "onnx"
    manifest = export(str(dual_encoder_model_dir), out, quantize="int8")
    quantize_int8(out / tower_file("text"), out / tower_file("text", "int8"))
    manifest["weights"]["text"] = "int8"
    (out / ONNX_MANIFEST).write_text(json.dumps(manifest))

    with caplog.at_level(logging.WARNING, logger="services.feature.onnx_runtime"):
        onnx = OnnxEmbedder.load(str(out), threads=1)
    assert onnx.dtype == "int8 (image), float32 (text)"
    assert list(onnx.fallbacks) == ["text"]
    assert "int8 vectors reach cosine 0.9" in onnx.fallbacks["text"]
    assert "below the bound 0.999" in onnx.fallbacks["text"]
    assert any("text tower runs in float32" in r.getMessage() for r in caplog.records)
    assert min(onnx.parity.values()) >= PARITY

    with TestClient(
        create_app(FeatureSettings(model=str(out), device="cpu"), token_keys=KEYS),
        headers=service_headers("feature"),
    ) as client:
        info = client.get("/model").json()
    assert info["dtype"] == "int8 (image), float32 (text)"
    assert info["fallbacks"] == onnx.fallbacks


def test_onnx_load_checks_the_parity_probe(onnx_dir: Path, tmp_path: Path) -> None:
    """Every load compares the export's vectors with the fp32 PyTorch vectors stored beside it,
    so an export that drifts on the serving machine (other integer kernels) refuses to start."""
    import shutil

    from services.feature.onnx_runtime import OnnxEmbedder
    from services.feature.parity import PROBE_FILE

    drifted = tmp_path / "drifted"
    shutil.copytree(onnx_dir, drifted)
    with np.load(drifted / PROBE_FILE) as saved:
        probe = {key: saved[key] for key in saved.files}
    # The stored vectors of two probe images swapped: as if this machine computed others.
    probe["image_vectors"] = probe["image_vectors"][[1, 0, 2]]
    np.savez(drifted / PROBE_FILE, **probe)
    with pytest.raises(ModelLoadError, match="differ from PyTorch"):
        OnnxEmbedder.load(str(drifted), threads=1)
    (drifted / PROBE_FILE).unlink()
    with pytest.raises(ModelLoadError, match="export it again"):
        OnnxEmbedder.load(str(drifted), threads=1)


def test_onnx_export_served(onnx_dir: Path, demo_model_dir: Path) -> None:
    # runtime auto recognises an export folder.
    settings = FeatureSettings(model=str(onnx_dir), device="cpu")
    with TestClient(
        create_app(settings, token_keys=KEYS), headers=service_headers("feature")
    ) as client:
        info = client.get("/model").json()
        body = client.post("/embed/text", json={"texts": ["a red circle"]}).json()
    assert info["runtime"] == "onnx" and info["architecture"] == "CLIPModel"
    assert body["model_id"] == info["model_id"] == default_model_id(str(demo_model_dir))


def test_export_refuses_to_overwrite_other_folders(tmp_path: Path, demo_model_dir: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        export_main(["--model", str(demo_model_dir), "--out", str(precious), "--force"])
    assert (precious / "notes.txt").read_text() == "keep me"


def test_runtime_resolution(
    demo_model_dir: Path, onnx_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import services.feature.model as model_module

    model = str(demo_model_dir)
    # auto on a CPU: bf16 autocast where the processor has native bfloat16, else float32;
    # both outcomes forced, whatever this machine's processor.
    monkeypatch.setattr(model_module, "cpu_supports_bf16", lambda: True)
    assert resolve_runtime("auto", "cpu", model) == "torch-bf16"
    monkeypatch.setattr(model_module, "cpu_supports_bf16", lambda: False)
    assert resolve_runtime("auto", "cpu", model) == "torch"
    with pytest.raises(ModelLoadError, match="bfloat16 support"):
        resolve_runtime("torch-bf16", "cpu", model)
    assert resolve_runtime("auto", "cuda", model) == "torch-fp16"
    assert resolve_runtime("auto", "cpu", str(onnx_dir)) == "onnx"
    with pytest.raises(ModelLoadError, match="needs CUDA"):
        resolve_runtime("torch-fp16", "cpu", model)
    with pytest.raises(ModelLoadError, match="export_onnx"):
        resolve_runtime("onnx", "cpu", model)
    with pytest.raises(ModelLoadError, match="unknown runtime"):
        resolve_runtime("tensorrt", "cpu", model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("runtime", ["torch-fp16", "torch-bf16", "torch"])
def test_cuda_runtimes(
    runtime: str, demo_model_dir: Path, demo_embedder: TransformersEmbedder, images: list
) -> None:
    cuda = TransformersEmbedder.load(str(demo_model_dir), device="cuda", runtime=runtime)
    assert cuda.device == "cuda"
    assert min_cosine(cuda.embed_images(images), demo_embedder.embed_images(images)) >= PARITY
    assert (
        min_cosine(cuda.embed_texts(TEXTS).vectors, demo_embedder.embed_texts(TEXTS).vectors)
        >= PARITY
    )


def test_onnx_export_of_a_model_with_dropout(dual_encoder_model_dir: Path, tmp_path: Path) -> None:
    """BERT (the dual encoder's text tower) has dropout layers: the export must neither trace
    them nor leave the model in training mode for the parity check that follows."""
    from services.feature.export_onnx import export
    from services.feature.onnx_runtime import OnnxEmbedder

    manifest = export(str(dual_encoder_model_dir), tmp_path / "onnx")
    assert manifest["architecture"] == "VisionTextDualEncoderModel"
    assert "token_type_ids" in manifest["text_inputs"]
    assert min(manifest["parity"].values()) >= PARITY
    onnx = OnnxEmbedder.load(str(tmp_path / "onnx"), threads=1)
    torch_model = TransformersEmbedder.load(str(dual_encoder_model_dir), device="cpu")
    texts = ["a dog", "two dogs playing in the snow, seen from far away", "word " * 600]
    got, expected = onnx.embed_texts(texts), torch_model.embed_texts(texts)
    assert got.truncated == expected.truncated == [False, False, True]
    assert min_cosine(got.vectors, expected.vectors) >= PARITY
