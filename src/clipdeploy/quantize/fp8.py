"""fp8 explicit quantization: FLOAT8E4M3FN QuantizeLinear/DequantizeLinear pairs, fp16 elsewhere.

TensorRT's FP8 placement: a Q -> DQ pair directly on each activation input of MatMul/Gemm/Conv
(per-tensor scale, calibrated amax / 448), and each weight stored as a FLOAT8E4M3FN initializer
feeding its DequantizeLinear (per-channel scale, amax / 448 per output channel). A float8 tensor
feeds nothing but its DequantizeLinear: no layout op, no LayerNorm, no graph output, so ONNX
Runtime's CPU provider (which runs float8 Q/DQ and nothing else in float8) loads it, and TensorRT
sees the pattern it fuses into fp8 kernels. Everything else becomes fp16, as in int8-fp16.

The Q/DQ are written here, on the prepared fp32 graph, from ONNX Runtime's int8 calibration cache
(the same ranges int8 uses): rewriting ONNX Runtime's int8 Q/DQ graph instead inherits its
optimizer's fusions and its Q/DQ through Transpose, neither of which exists in float8. The int8
graph is still made, because recovery ranks nodes on it.

The patch embedding (the Conv that reads the pixels) stays unquantized by default: the first layer
sees the raw image, and NVIDIA's own CLIP FP8 recipe leaves it out for accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy.deps import require
from clipdeploy.quantize import graph, int8
from clipdeploy.quantize.make import MadeVariant, MakeRequest

OPSET = 19  # FLOAT8E4M3FN QuantizeLinear/DequantizeLinear exist from opset 19 on
FP8_MAX = 448.0  # largest finite E4M3FN value
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")


def upgrade_opset(path: Path, opset: int = OPSET) -> int:
    """Convert the default-domain opset of the model at ``path`` to ``opset`` if older; returns the old one."""
    onnx = require("onnx", "export")
    from onnx import version_converter  # here, not at the top: onnx is an optional (export) dependency

    model = graph.load(path)
    old = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if old < opset:
        model = version_converter.convert_version(model, opset)
        if graph.fits(model):
            onnx.checker.check_model(model)
        path.with_name(path.name + ".data").unlink(missing_ok=True)  # onnx appends to an existing side file
        graph.save(model, path)
    return old


def to_fp8(array: np.ndarray) -> np.ndarray:
    """``array`` rounded to E4M3FN, saturating: E4M3FN has no infinity, and casting past 448 gives NaN."""
    ml_dtypes = require("ml_dtypes", "export")
    return np.clip(array, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def patch_embedding(model: Any) -> list[str]:
    """The Conv nodes that read a graph input directly (the patch embedding, a CNN's stem)."""
    inputs = {i.name for i in model.graph.input}
    return [n.name or n.output[0] for n in model.graph.node if n.op_type == "Conv" and n.input[0] in inputs]


def _weight_axis(node: Any, weight: np.ndarray) -> int:
    """The output-channel axis of a MatMul/Gemm/Conv weight (per-channel scales run along it)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return weight.ndim - 1  # MatMul: (..., K, N)


def insert_qdq(model: Any, ranges: dict[str, tuple[float, float]], exclude: Sequence[str] = ()) -> tuple[Any, dict[str, Any]]:
    """FLOAT8E4M3FN Q/DQ on the inputs of every MatMul/Gemm/Conv of the fp32 ModelProto ``model``
    (opset >= 19) not named in ``exclude``. Activation scales come from ``ranges`` (tensor ->
    calibrated (low, high)); an activation input without a range is left unquantized, and so is its node.

    Returns the new ModelProto and what it did."""
    ir = require("onnx_ir", "export")

    m = graph.to_ir(model)
    del model
    g = m.graph
    excluded = set(exclude)
    counts: dict[str, Any] = {"activation_qdq": 0, "fp8_weights": 0, "nodes_quantized": 0,
                              "left_unquantized": {"excluded": [], "no_range": []}}
    made: dict[str, ir.Value] = {}  # one Q/DQ pair (or fp8 weight) per source tensor, shared by its readers

    def initializer(name: str, array: np.ndarray, dtype: Any = None) -> ir.Value:
        t = ir.tensor(array, dtype=dtype, name=name)
        v = ir.Value(name=name, type=ir.TensorType(t.dtype), shape=ir.Shape(array.shape), const_value=t)
        g.register_initializer(v)
        return v

    def activation(x: ir.Value, before: ir.Node) -> ir.Value:
        if x.name in made:
            return made[x.name]
        lo, hi = ranges[x.name]
        scale = np.float32(max(abs(lo), abs(hi)) / FP8_MAX)
        tag = f"{x.name}_fp8"
        s = initializer(f"{tag}_scale", np.array(scale, np.float32))
        z = initializer(f"{tag}_zero_point", to_fp8(np.zeros((), np.float32)), ir.DataType.FLOAT8E4M3FN)
        q = ir.node("QuantizeLinear", [x, s, z], name=f"{tag}_QuantizeLinear")
        q.outputs[0].name = f"{tag}_quantized"
        dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name=f"{tag}_DequantizeLinear")
        dq.outputs[0].name = f"{tag}_dequantized"
        g.insert_before(before, [q, dq])
        counts["activation_qdq"] += 1
        made[x.name] = dq.outputs[0]
        return dq.outputs[0]

    def weight(w: ir.Value, node: ir.Node, before: ir.Node) -> ir.Value:
        if w.name in made:
            return made[w.name]
        values = w.const_value.numpy().astype(np.float32)
        axis = _weight_axis(node, values)
        amax = np.abs(values).max(axis=tuple(a for a in range(values.ndim) if a != axis))
        scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
        shape = [1] * values.ndim
        shape[axis] = -1
        tag = f"{w.name}_fp8"
        q = initializer(tag, to_fp8(values / scale.reshape(shape)), ir.DataType.FLOAT8E4M3FN)
        s = initializer(f"{tag}_scale", scale)
        z = initializer(f"{tag}_zero_point", to_fp8(np.zeros(scale.shape, np.float32)), ir.DataType.FLOAT8E4M3FN)
        dq = ir.node("DequantizeLinear", [q, s, z], {"axis": axis}, name=f"{tag}_DequantizeLinear")
        dq.outputs[0].name = f"{tag}_dequantized"
        g.insert_before(before, [dq])
        counts["fp8_weights"] += 1
        made[w.name] = dq.outputs[0]
        return dq.outputs[0]

    for node in [n for n in g if n.op_type in QUANTIZED_OPS]:
        label = node.name or node.outputs[0].name
        if label in excluded:
            counts["left_unquantized"]["excluded"].append(label)
            continue
        data = [k for k in (0, 1) if k < len(node.inputs) and node.inputs[k] is not None]
        consts = {k for k in data if node.inputs[k].is_initializer() and node.inputs[k].const_value is not None}
        if any(node.inputs[k].name not in ranges for k in data if k not in consts) or 0 in consts:
            counts["left_unquantized"]["no_range"].append(label)
            continue
        for k in data:
            x = node.inputs[k]
            node.replace_input_with(k, weight(x, node, node) if k in consts else activation(x, node))
        counts["nodes_quantized"] += 1
    for w in list(g.initializers.values()):  # weights now stored in fp8 only
        if not w.uses() and not w.is_graph_output():
            g.initializers.pop(w.name)
    proto = graph.to_proto(m)
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < OPSET:
            raise ValueError(f"fp8 Q/DQ needs opset {OPSET}; the graph is opset {opset.version} (call upgrade_opset)")
    return proto, counts


def make(req: MakeRequest) -> MadeVariant:
    """The fp8 make step: FLOAT8E4M3FN Q/DQ from int8's calibrated ranges, then fp16 elsewhere."""
    info: dict[str, Any] = {}
    fp32 = req.work / f"{req.tower}.fp8-prepared.onnx"
    if not fp32.exists():  # reused by every recovery round
        graph.save(graph.load(int8.prepared(req)), fp32)
        info["opset_upgraded_from"] = upgrade_opset(fp32)
    # Calibrates once (cached, shared with int8); recovery ranks nodes on this int8 graph.
    qdq = req.scratch("qdq")
    info.update(int8.calibrate(req, qdq))
    info.pop("layernorm_after_conv_quantized", None)  # an int8 detail: fp8 quantizes no LayerNorm
    ranges = int8.calibrated_ranges(req.artifact / info["calibration_cache"]["file"])
    stem = patch_embedding(graph.load(fp32)) if req.cfg.fp8_patch_embedding == "fp16" else []
    proto, info["fp8"] = insert_qdq(graph.load(fp32), ranges, [*req.exclude, *stem])
    info["fp8"]["patch_embedding"] = {"nodes": stem, "kept": "fp16"} if stem else {"kept": "fp8"}
    fp8_qdq = req.scratch("fp8qdq")
    graph.save(proto, fp8_qdq)
    info["fp16"] = int8.fp16_elsewhere(req, fp8_qdq)
    return MadeVariant(info, qdq=qdq)
