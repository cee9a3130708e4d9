"""int8 versions of exported ONNX towers (``export_onnx --quantize int8``).

ONNX Runtime's dynamic quantisation: every product with a weight matrix gets int8 weights (one
scale per output channel) and quantises its input per batch at run time, so no calibration data
is needed. Whether the result is close enough to fp32 is for the caller to check (the export's
parity probe).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantisation of the matrix multiplications, patch embeddings included (see
    ``patch_convolutions_as_products``); other convolutions stay fp32, as ONNX Runtime's
    integer convolution is slower than its fp32 one. Per-channel weight scales keep the vectors
    within the parity bound.

    Weights use 7 bits (``reduce_range``: at most 64 in magnitude): on a processor without VNNI (AVX2 only) ONNX
    Runtime's uint8 x int8 kernel adds pairs of products in 16-bit lanes, which saturate with
    full-range weights (the test CLIP's text tower: cosine 0.978 against float32 there, 0.9998
    with AVX-512 VNNI). With 7-bit weights no sum can saturate, so every kernel computes the same
    integers and the vectors are the same on every x86 processor (0.99975 on both)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source))
    patch_convolutions_as_products(graph)

    # The quantiser logs a line per tensor on the root logger, and advises a pre-processing
    # step that made no difference here.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            graph,
            str(target),
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            reduce_range=True,
            weight_type=QuantType.QInt8,
        )
    finally:
        root.setLevel(level)


def patch_convolutions_as_products(model: onnx.ModelProto) -> int:
    """Rewrite each patch-embedding convolution (kernel = stride, no padding: a ViT's 32x32
    patches) as reshapes and one matrix product, the same arithmetic in a form the quantiser
    turns into an int8 product. Returns how many were rewritten. A ViT-B/32's patch embedding
    is 6 % of its int8 pass as an fp32 convolution."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        info.name: [d.dim_value or None for d in info.type.tensor_type.shape.dim]
        for info in [*inferred.graph.value_info, *inferred.graph.input]
    }
    weights = {w.name: w for w in model.graph.initializer}
    nodes: list[Any] = []
    rewritten = 0
    for node in model.graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "Conv" else None
        shape = shapes.get(node.input[0], []) if weight is not None else []
        if weight is None or len(shape) != 4 or len(weight.dims) != 4:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        out_channels, channels, kh, kw = weight.dims
        height, width = shape[2], shape[3]
        if (
            (kh, kw) == (1, 1)
            or list(attrs.get("strides", [1, 1])) != [kh, kw]
            or any(attrs.get("pads", [0]))
            or attrs.get("group", 1) != 1
            or any(d != 1 for d in attrs.get("dilations", [1, 1]))
            or not height
            or not width
            or height % kh
            or width % kw
        ):
            nodes.append(node)
            continue
        rows, cols, features = height // kh, width // kw, channels * kh * kw
        name = f"{node.name or node.output[0]}/as_product"
        matrix = numpy_helper.to_array(weight).reshape(out_channels, features).T
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(
                    np.array([0, channels, rows, kh, cols, kw], np.int64), f"{name}/grid"
                ),
                numpy_helper.from_array(
                    np.array([0, rows, cols, features], np.int64), f"{name}/patches"
                ),
                numpy_helper.from_array(np.ascontiguousarray(matrix), f"{name}/weight"),
            ]
        )
        product = f"{name}/product"
        nodes += [
            helper.make_node("Reshape", [node.input[0], f"{name}/grid"], [f"{name}/grid_out"]),
            helper.make_node(
                "Transpose", [f"{name}/grid_out"], [f"{name}/t_out"], perm=[0, 2, 4, 1, 3, 5]
            ),
            helper.make_node("Reshape", [f"{name}/t_out", f"{name}/patches"], [f"{name}/rows"]),
            helper.make_node("MatMul", [f"{name}/rows", f"{name}/weight"], [product]),
        ]
        if len(node.input) > 2 and node.input[2]:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [f"{name}/biased"]))
            product = f"{name}/biased"
        nodes.append(helper.make_node("Transpose", [product], [node.output[0]], perm=[0, 3, 1, 2]))
        rewritten += 1
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        used = {i for n in model.graph.node for i in n.input}
        unused = [w for w in model.graph.initializer if w.name not in used]
        for w in unused:
            model.graph.initializer.remove(w)
    return rewritten
