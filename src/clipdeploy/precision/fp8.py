"""fp8 explicit quantization: FLOAT8E4M3FN QuantizeLinear/DequantizeLinear pairs, fp16 elsewhere.

Made from the int8 Q/DQ graph (same calibration, same placement: MatMul/Gemm/Conv inputs, LayerNorm
after a Conv), then every pair is turned into E4M3: activation scales become calibrated amax / 448
(per tensor), weight scales per-channel amax / 448, zero points FLOAT8E4M3FN zeros. Weights are
stored compactly as FLOAT8E4M3FN initializers feeding their DequantizeLinear (no weight
QuantizeLinear left), the form TensorRT 10/11 and ONNX Runtime's CPU provider both read. FLOAT8
Q/DQ needs opset 19, so the prepared fp32 graph is converted to opset 19 before quantization.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy.deps import require
from clipdeploy.precision import fp16, graph, int8

OPSET = 19  # FLOAT8E4M3FN QuantizeLinear/DequantizeLinear exist from opset 19 on
FP8_MAX = 448.0  # largest finite E4M3FN value
RANGE_SAMPLES = 64  # calibration samples the fp16 pass observes (as stage.RANGE_SAMPLES)
INT8_MAX = 127.0  # ONNX Runtime's symmetric int8 range is [-127, 127]: scale = amax / 127


def upgrade_opset(path: Path, opset: int = OPSET) -> int:
    """Convert the default-domain opset of the model at ``path`` to ``opset`` if older; returns the old one."""
    onnx = require("onnx", "export")
    from onnx import version_converter

    model = graph.load(path)
    old = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if old < opset:
        model = version_converter.convert_version(model, opset)
        if graph.fits(model):
            onnx.checker.check_model(model)
        path.with_name(path.name + ".data").unlink(missing_ok=True)  # onnx appends to an existing side file
        graph.save(model, path)
    return old


def _fp8(array: np.ndarray) -> np.ndarray:
    ml_dtypes = require("ml_dtypes", "export")
    # E4M3FN has no infinity: saturate instead of producing NaN for values past 448.
    return np.clip(array, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def int8_to_fp8(model: Any) -> tuple[Any, dict[str, int]]:
    """Turn an int8 Q/DQ ModelProto (ONNX Runtime's, symmetric) into FLOAT8E4M3FN Q/DQ.

    Returns the new ModelProto and counts of what it changed."""
    ir = require("onnx_ir", "export")

    m = graph.to_ir(model)
    del model
    g = m.graph
    rescaled: set[str] = set()
    counts = {"activation_qdq": 0, "fp8_weights": 0, "layernorm_inputs_left_unquantized": _unquantize_layernorms(g)}
    qdq = [n for n in g if n.op_type in ("QuantizeLinear", "DequantizeLinear")]  # after the LayerNorm pass
    for node in qdq:
        scale, zero = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
        if scale is None or scale.const_value is None:
            raise ValueError(f"{node.name}: a Q/DQ scale that is not an initializer cannot be made fp8")
        if scale.name not in rescaled:  # scales and zero points are shared by a Q and its DQ
            s = scale.const_value.numpy().astype(np.float32) * np.float32(INT8_MAX / FP8_MAX)
            scale.const_value = ir.tensor(s, name=scale.name)
            rescaled.add(scale.name)
        if zero is not None and zero.name not in rescaled:
            z = _fp8(np.zeros(zero.const_value.shape.numpy() if zero.const_value is not None else (), np.float32))
            zero.const_value = ir.tensor(z, dtype=ir.DataType.FLOAT8E4M3FN, name=zero.name)
            zero.dtype = ir.DataType.FLOAT8E4M3FN
            rescaled.add(zero.name)
        for out in node.outputs:
            if node.op_type == "QuantizeLinear":
                out.dtype = ir.DataType.FLOAT8E4M3FN
    counts["dequantized_before_layout_op"] = _dequantize_before_layout_ops(g, qdq)
    for node in qdq:
        if node.op_type != "QuantizeLinear":
            continue
        w = node.inputs[0]
        if not (w.is_initializer() and w.const_value is not None):
            counts["activation_qdq"] += 1
            continue
        # A weight: quantize it here and let its DequantizeLinear read the fp8 tensor directly.
        scale = node.inputs[1].const_value.numpy()
        weights = w.const_value.numpy().astype(np.float32)
        if scale.ndim == 1 and scale.size > 1:
            axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 1
            shape = [1] * weights.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
        name = f"{w.name}_fp8"
        q = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT8E4M3FN), shape=ir.Shape(weights.shape),
                     const_value=ir.tensor(_fp8(weights / scale), dtype=ir.DataType.FLOAT8E4M3FN, name=name))
        g.register_initializer(q)
        node.outputs[0].replace_all_uses_with(q)
        g.remove(node, safe=True)
        if not w.uses() and not w.is_graph_output():
            g.initializers.pop(w.name, None)
        counts["fp8_weights"] += 1
    proto = graph.to_proto(m)
    del proto.graph.value_info[:]  # types changed; let the consumers re-infer them
    return proto, counts


def _unquantize_layernorms(g: Any) -> int:
    """Drop the int8 path's Q/DQ on LayerNorm inputs (after a Conv): ONNX Runtime's optimizer moves
    such a QuantizeLinear up through the Transpose before it, and no provider transposes FLOAT8. The
    LayerNorm runs in fp32 either way; TensorRT loses only the Conv's fp8 output."""
    dropped = 0
    for ln in [n for n in g if n.op_type == "LayerNormalization"]:
        dq = ln.inputs[0].producer()
        q = dq.inputs[0].producer() if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            continue
        ln.replace_input_with(0, q.inputs[0])
        for node in (dq, q):
            if not any(o.uses() or o.is_graph_output() for o in node.outputs):
                g.remove(node, safe=True)
        dropped += 1
    return dropped


def _dequantize_before_layout_ops(g: Any, qdq: list[Any]) -> int:
    """ONNX Runtime's quantizer lets int8 flow through layout ops (Q -> Transpose -> DQ); no runtime
    moves FLOAT8 through them, so dequantize first: Q -> DQ -> Transpose, with the Q's own scale
    (per tensor: a layout op does not change it). TensorRT moves the DQ forward by itself."""
    ir = require("onnx_ir", "export")

    moved = 0
    for q in [n for n in qdq if n.op_type == "QuantizeLinear"]:
        y = q.outputs[0]
        for c, k in list(y.uses()):
            if c.op_type == "DequantizeLinear":
                continue
            if q.inputs[1].const_value.numpy().size > 1:
                raise ValueError(f"{c.name}: a per-channel Q/DQ through a {c.op_type} cannot be made fp8")
            dq = ir.node("DequantizeLinear", [y, *q.inputs[1:]], name=f"{q.name}_fp8_dq_{moved}")
            dq.outputs[0].name = f"{y.name}_fp8_dq_{moved}"
            g.insert_after(q, [dq])
            c.replace_input_with(k, dq.outputs[0])
            # The int8 DequantizeLinear downstream of the layout op now reads a float: drop it.
            for out in c.outputs:
                for d, _ in list(out.uses()):
                    if d.op_type == "DequantizeLinear":
                        d.outputs[0].replace_all_uses_with(out)
                        g.remove(d, safe=True)
            moved += 1
    return moved


def make_fp8(stage: Any, tower: str, src: Path, out: Path, work: Path, exclude: list[str], suffix: str) -> dict[str, Any]:
    """The fp8 make step (PrecisionSpec.make; signature as precision/stage.py's make steps)."""
    prepared = work / f"{tower}.prepared.onnx"
    info: dict[str, Any] = {}
    if not prepared.exists():  # the stage reuses it for every round and for recovery's ranking
        int8.prepare(src, prepared)
        info["opset_upgraded_from"] = upgrade_opset(prepared)
    qdq = work / f"{tower}.qdq{suffix}.onnx"
    # Calibrates once (cached) and places Q/DQ as int8 does; recovery ranks nodes on this int8 graph.
    info.update(stage.quantize_int8(tower, qdq, work, exclude, suffix))
    fp8_qdq = work / f"{tower}.fp8qdq{suffix}.onnx"
    proto, info["fp8"] = int8_to_fp8(graph.load(qdq))
    graph.save(proto, fp8_qdq)
    keep = fp16.ALWAYS_FP32_OPS + ("QuantizeLinear", "DequantizeLinear")
    tmp = work / f"{tower}.fp16pass{suffix}.onnx"
    info["fp16"] = fp16.convert(fp8_qdq, tmp, stage.feeds(tower, RANGE_SAMPLES), keep_fp32_ops=keep)
    graph.save(int8.fold_qdq_into_fp16(graph.load(tmp)), out)
    return info
