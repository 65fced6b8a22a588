"""int8 explicit quantization: TensorRT-compatible QuantizeLinear/DequantizeLinear pairs in the graph.

Symmetric int8, zero-point 0, per-channel weights on the output-channel axis, activations calibrated
on real data; no bias quantization and no Q/DQ on outputs. The inputs of MatMul, Gemm and Conv are
quantized; Softmax stays unquantized, and so does LayerNorm except where it reads a Conv's output
(ConvNeXt: Conv → Transpose → LayerNorm), as TensorRT's placement rules have it. ``int8-fp16``
then converts what is left to fp16, with fp16 scales (opset 19) so each DequantizeLinear feeds its
fp16 consumer directly, the form TensorRT's strongly typed builder fuses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy import progress
from clipdeploy.precision import graph
from clipdeploy.deps import require

log = logging.getLogger(__name__)

OPS_TO_QUANTIZE = ("MatMul", "Gemm", "Conv")
METHODS = ("minmax", "entropy", "percentile")
QDQ_OPTIONS = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "QuantizeBias": False,
    "AddQDQPairToWeight": True,
    "DedicatedQDQPair": False,
    "QDQDisableWeightAdjustForInt32Bias": True,
    # ONNX Runtime also quantizes these ops' outputs by default; TensorRT wants Q/DQ on inputs only.
    "OpTypesToExcludeOutputQuantization": list(OPS_TO_QUANTIZE),
}
FP16_SCALE_OPSET = 19  # QuantizeLinear/DequantizeLinear take fp16 scales from opset 19 on


def prepare(src: Path, dst: Path) -> None:
    """ONNX Runtime's recommended pre-pass: shape inference and basic graph optimizations."""
    require("onnxruntime.quantization.shape_inference", "cpu")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    model = graph.load(dst)
    drop_unused_opsets(model)
    graph.save(model, dst)


def drop_unused_opsets(model: Any) -> None:
    """The optimizer declares every ONNX Runtime domain; keep the ones nodes use, for other parsers."""
    used = {n.domain or "" for n in model.graph.node} | {""}
    kept = [o for o in model.opset_import if (o.domain or "") in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def quantizable_nodes(model: Any) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in OPS_TO_QUANTIZE]


class _FeedReader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:  # made on first use: with a calibration cache, nothing is read or shown
            self._it = iter(progress.bar(self._feeds, "calibration batches", unit="batch"))
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None


def quantize(
    prepared: Path,
    dst: Path,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    method: str,
    cache: Path,
    exclude: Sequence[str] = (),
) -> list[str]:
    """Write the int8 Q/DQ model; returns the LayerNorms it quantized after a Conv.

    Activation ranges come from ``cache`` when it exists, else from calibrating on ``feeds`` (and are
    then saved there), so recovery rounds calibrate once."""
    require("onnxruntime.quantization", "cpu")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calibrate_method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    large = prepared.stat().st_size > graph.EXTERNAL_DATA_THRESHOLD
    quantize_static(
        str(prepared),
        str(dst),
        _FeedReader(feeds),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(OPS_TO_QUANTIZE),
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(exclude),
        calibrate_method=calibrate_method,
        use_external_data_format=large,
        extra_options=dict(QDQ_OPTIONS),
        calibration_cache_path=str(cache),
    )
    model = graph.load(dst)
    layernorms = quantize_layernorm_after_conv(model, calibrated_ranges(cache), exclude)
    if layernorms:
        # onnx appends to an existing side file: drop the one ONNX Runtime wrote before saving again.
        dst.with_name(dst.name + ".data").unlink(missing_ok=True)
        graph.save(model, dst)
    return layernorms


# Ops that only move values around: a LayerNorm behind them still reads the Conv's output values.
LAYOUT_OPS = ("Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten")


def calibrated_ranges(cache: Path) -> dict[str, tuple[float, float]]:
    """(lowest, highest) per tensor from ONNX Runtime's calibration cache (its TensorsData JSON)."""
    import json

    def values(v: Any) -> np.ndarray:  # minmax stores {"data": [...]}, entropy and percentile a float
        return np.asarray(v["data"] if isinstance(v, dict) else v, dtype=np.float64)

    data = json.loads(cache.read_text(encoding="utf-8")).get("data", {})
    return {
        name: (float(values(t["lowest"]).min()), float(values(t["highest"]).max()))
        for name, t in data.items()
        if isinstance(t, dict) and "lowest" in t and "highest" in t
    }


def conv_fed_layernorms(model: Any) -> list[tuple[Any, Any]]:
    """(LayerNorm node, its Conv node) for each LayerNorm whose input is a Conv output, directly or
    through layout ops only."""
    producers = {o: n for n in model.graph.node for o in n.output}
    found = []
    for node in model.graph.node:
        if node.op_type != "LayerNormalization":
            continue
        src = producers.get(node.input[0])
        while src is not None and src.op_type in LAYOUT_OPS:
            src = producers.get(src.input[0])
        if src is not None and src.op_type == "Conv":
            found.append((node, src))
    return found


def quantize_layernorm_after_conv(
    model: Any, ranges: dict[str, tuple[float, float]], exclude: Sequence[str] = ()
) -> list[str]:
    """Put a symmetric int8 Q/DQ pair on the input of each LayerNorm fed by a Conv, so TensorRT can
    let the Conv write int8. Its scale is the Conv output's calibrated range (layout ops keep the
    values); gamma, beta and the output stay fp32. Skipped where recovery keeps that Conv in fp32.
    Returns the LayerNorms it quantized (by name, or by output tensor for an unnamed node)."""
    require("onnx", "export")
    from onnx import helper, numpy_helper

    g = model.graph
    excluded = set(exclude)
    done = []
    for ln, conv in conv_fed_layernorms(model):
        conv_out = conv.output[0]
        if (conv.name and conv.name in excluded) or conv_out not in ranges:
            continue
        lo, hi = ranges[conv_out]
        amax = max(abs(lo), abs(hi))
        if not np.isfinite(amax) or amax <= 0:
            continue
        # Named after the LayerNorm's output, which is unique even where node names are empty.
        tag = f"{ln.output[0]}_ln_input"
        scale, zero = f"{tag}_scale", f"{tag}_zero_point"
        g.initializer.extend([
            numpy_helper.from_array(np.array(amax / 127.0, dtype=np.float32), scale),
            numpy_helper.from_array(np.array(0, dtype=np.int8), zero),
        ])
        q_out, dq_out = f"{tag}_quantized", f"{tag}_dequantized"
        g.node.extend([
            helper.make_node("QuantizeLinear", [ln.input[0], scale, zero], [q_out], name=f"{tag}_QuantizeLinear"),
            helper.make_node("DequantizeLinear", [q_out, scale, zero], [dq_out], name=f"{tag}_DequantizeLinear"),
        ])
        ln.input[0] = dq_out
        done.append(ln.name or ln.output[0])
    if done:
        graph.toposort(g)
    return done


# ---- int8 with fp16 elsewhere -----------------------------------------------------------------


def _to_fp16_initializer(model: Any, name: str) -> None:
    require("onnx", "export")
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name and init.data_type == 1:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), name))
            return


def fold_qdq_into_fp16(model: Any) -> Any:
    """After the fp16 pass (with Q/DQ kept in fp32), make every Q/DQ fp16-typed and drop the Casts
    the pass put around them, so DequantizeLinear outputs feed fp16 MatMul/Conv directly."""
    require("onnx", "export")
    from onnx import TensorProto, helper

    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    initializers = {i.name for i in g.initializer}
    fp32_tensors = graph.fp32_tensors(model)
    new_nodes: list[Any] = []
    removed: set[int] = set()
    counter = 0

    def cast(src: str, to: int) -> str:
        nonlocal counter
        counter += 1
        out = f"{src}_qdq_cast{counter}"
        new_nodes.append(helper.make_node("Cast", [src], [out], to=to, name=f"qdq_cast_{counter}"))
        return out

    for node in list(g.node):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for scale in node.input[1:2]:
            _to_fp16_initializer(model, scale)
        if node.op_type == "QuantizeLinear":
            x = node.input[0]
            src = producers.get(x)
            if x in initializers:
                _to_fp16_initializer(model, x)
            elif src is not None and src.op_type == "Cast" and src.input[0] not in fp32_tensors:
                node.input[0] = src.input[0]  # bypass the fp16->fp32 Cast the pass inserted
                if all(c is node for c in consumers.get(x, [])):
                    removed.add(id(src))
            elif x in fp32_tensors:
                node.input[0] = cast(x, TensorProto.FLOAT16)
        else:
            y = node.output[0]
            for c in consumers.get(y, []):
                if c.op_type == "Cast" and c.attribute[0].i == TensorProto.FLOAT16:
                    # Its consumers read the DequantizeLinear output directly.
                    for cc in consumers.get(c.output[0], []):
                        for k, name in enumerate(cc.input):
                            if name == c.output[0]:
                                cc.input[k] = y
                    removed.add(id(c))
                elif c.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                    fp32_view = cast(y, TensorProto.FLOAT)
                    for k, name in enumerate(c.input):
                        if name == y:
                            c.input[k] = fp32_view
    kept = [n for n in g.node if id(n) not in removed]
    del g.node[:]
    g.node.extend(kept + new_nodes)
    graph.toposort(g)
    del g.value_info[:]  # types changed; let the consumers re-infer them
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < FP16_SCALE_OPSET:
            opset.version = FP16_SCALE_OPSET
    return model
