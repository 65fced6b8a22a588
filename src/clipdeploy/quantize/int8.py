"""int8 explicit quantization: TensorRT-compatible QuantizeLinear/DequantizeLinear pairs in the graph.

Symmetric int8, zero-point 0, per-channel weights on the output-channel axis, activations calibrated
on real data; no bias quantization and no Q/DQ on outputs. The inputs of MatMul, Gemm and Conv are
quantized; Softmax stays unquantized, and so does LayerNorm except where it reads a Conv's output
(ConvNeXt: Conv → Transpose → LayerNorm), as TensorRT's placement rules have it. ``int8-fp16``
then converts what is left to fp16, with fp16 scales (opset 19) so each DequantizeLinear feeds its
fp16 consumer directly, the form TensorRT's strongly typed builder fuses.

The make steps of int8 and int8-fp16 are here (``make``, ``make_int8_fp16``), and so is what every
calibrated precision shares: ``calibrate`` (the int8 Q/DQ graph, from the artifact's calibration cache
when it has one) and ``fp16_elsewhere`` (the "Q/DQ, fp16 elsewhere" tail of int8-fp16 and fp8).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipdeploy import progress
from clipdeploy.artifact.manifest import atomic_write_bytes
from clipdeploy.artifact.tool_versions import installed
from clipdeploy.deps import require
from clipdeploy.quantize import fp16, graph
from clipdeploy.quantize.config import METHODS
from clipdeploy.quantize.make import MadeVariant, MakeRequest

if TYPE_CHECKING:
    import onnx_ir as ir

log = logging.getLogger(__name__)

OPS_TO_QUANTIZE = ("MatMul", "Gemm", "Conv")
WEIGHT_LAYOUTS = ("int8", "fp32")  # how weights are stored: compact int8 initializers, or fp32 with a Q/DQ pair
QDQ_OPTIONS = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "QuantizeBias": False,
    # False: each weight is stored once, as an int8 initializer feeding DequantizeLinear (a quarter of
    # the fp32 size), TensorRT's standard explicit-quantization weight pattern. True keeps the fp32
    # weight with a QuantizeLinear/DequantizeLinear pair beside it: the same values, four times the bytes.
    "AddQDQPairToWeight": False,
    "DedicatedQDQPair": False,
    "QDQDisableWeightAdjustForInt32Bias": True,
    # ONNX Runtime also quantizes these ops' outputs by default; TensorRT wants Q/DQ on inputs only.
    "OpTypesToExcludeOutputQuantization": list(OPS_TO_QUANTIZE),
}
FP16_SCALE_OPSET = 19  # QuantizeLinear/DequantizeLinear take fp16 scales from opset 19 on


def qdq_options(weights: str = "int8") -> dict[str, Any]:
    """ONNX Runtime's quantize_static extra options for TensorRT-style Q/DQ, with weights stored as
    ``weights`` (one of WEIGHT_LAYOUTS). Shared by every Q/DQ precision."""
    if weights not in WEIGHT_LAYOUTS:
        raise ValueError(f"weights layout {weights!r} is not one of {', '.join(WEIGHT_LAYOUTS)}")
    return {**QDQ_OPTIONS, "AddQDQPairToWeight": weights == "fp32",
            "OpTypesToExcludeOutputQuantization": list(OPS_TO_QUANTIZE)}


def weight_layout(model: Any) -> str:
    """How a Q/DQ ModelProto stores its quantized weights: "int8" when every DequantizeLinear that reads
    an initializer reads an int8 one (no QuantizeLinear on a weight), else "fp32"."""
    inits = {i.name: i.data_type for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in inits:
            return "fp32"
    return "int8"


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
    weights: str = "int8",
) -> list[str]:
    """Write the int8 Q/DQ model; returns the LayerNorms it quantized after a Conv.

    ``weights="int8"`` (the default) stores each quantized weight as an int8 initializer feeding
    DequantizeLinear; ``"fp32"`` keeps the fp32 weight with a Q/DQ pair (the older, 4x larger layout,
    the same dequantized values).

    Activation ranges come from ``cache`` when it exists, else from calibrating on ``feeds`` (and are
    then saved there), so recovery rounds calibrate once."""
    require("onnxruntime.quantization", "cpu")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calibrate_method = dict(zip(METHODS, (CalibrationMethod.MinMax, CalibrationMethod.Entropy,
                                          CalibrationMethod.Percentile), strict=True))[method]
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
        extra_options=qdq_options(weights),
        calibration_cache_path=str(cache),
    )
    model = graph.to_ir(graph.load(dst))
    layernorms = quantize_layernorm_after_conv(model, calibrated_ranges(cache), exclude)
    if layernorms:
        # onnx appends to an existing side file: drop the one ONNX Runtime wrote before saving again.
        dst.with_name(dst.name + ".data").unlink(missing_ok=True)
        graph.save(graph.to_proto(model), dst)
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


def conv_fed_layernorms(model: ir.Model) -> list[tuple[ir.Node, ir.Node]]:
    """(LayerNorm node, its Conv node) for each LayerNorm whose input is a Conv output, directly or
    through layout ops only."""
    found = []
    for node in model.graph:
        if node.op_type != "LayerNormalization":
            continue
        src = node.inputs[0].producer()
        while src is not None and src.op_type in LAYOUT_OPS:
            src = src.inputs[0].producer()
        if src is not None and src.op_type == "Conv":
            found.append((node, src))
    return found


def quantize_layernorm_after_conv(
    model: ir.Model, ranges: dict[str, tuple[float, float]], exclude: Sequence[str] = ()
) -> list[str]:
    """Put a symmetric int8 Q/DQ pair on the input of each LayerNorm fed by a Conv, so TensorRT can
    let the Conv write int8. Its scale is the Conv output's calibrated range (layout ops keep the
    values); gamma, beta and the output stay fp32. Skipped where recovery keeps that Conv in fp32.
    Returns the LayerNorms it quantized (by name, or by output tensor for an unnamed node)."""
    ir = require("onnx_ir", "export")

    g = model.graph
    excluded = set(exclude)
    done = []
    for ln, conv in conv_fed_layernorms(model):
        conv_out = conv.outputs[0].name
        if (conv.name and conv.name in excluded) or conv_out not in ranges:
            continue
        lo, hi = ranges[conv_out]
        amax = max(abs(lo), abs(hi))
        if not np.isfinite(amax) or amax <= 0:
            continue
        # Named after the LayerNorm's output, which is unique even where node names are empty.
        tag = f"{ln.outputs[0].name}_ln_input"
        scale = _initializer(g, f"{tag}_scale", np.array(amax / 127.0, dtype=np.float32))
        zero = _initializer(g, f"{tag}_zero_point", np.array(0, dtype=np.int8))
        q = ir.node("QuantizeLinear", [ln.inputs[0], scale, zero], name=f"{tag}_QuantizeLinear")
        q.outputs[0].name = f"{tag}_quantized"
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero], name=f"{tag}_DequantizeLinear")
        dq.outputs[0].name = f"{tag}_dequantized"
        g.insert_before(ln, [q, dq])  # right after the input's producer's turn: order stays valid
        ln.replace_input_with(0, dq.outputs[0])
        done.append(ln.name or ln.outputs[0].name)
    return done


def _initializer(g: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    ir = require("onnx_ir", "export")

    value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape),
                     const_value=ir.tensor(array, name=name))
    g.register_initializer(value)
    return value


# ---- int8 with fp16 elsewhere -----------------------------------------------------------------


def _to_fp16_initializer(value: ir.Value) -> None:
    ir = require("onnx_ir", "export")

    if value.is_initializer() and value.const_value is not None and value.const_value.dtype == ir.DataType.FLOAT:
        value.const_value = ir.tensor(value.const_value.numpy().astype(np.float16), name=value.name)
        value.dtype = ir.DataType.FLOAT16


def fold_qdq_into_fp16(model: Any) -> Any:
    """After the fp16 pass (with Q/DQ kept in fp32), make every Q/DQ fp16-typed and drop the Casts
    the pass put around them, so DequantizeLinear outputs feed fp16 MatMul/Conv directly.

    Takes and returns a ModelProto (a new one)."""
    ir = require("onnx_ir", "export")

    m = graph.to_ir(model)
    del model
    g = m.graph
    fp32 = graph.fp32_values(m)
    counter = 0

    def cast(src: ir.Value, to: ir.DataType) -> ir.Value:
        nonlocal counter
        counter += 1
        node = ir.node("Cast", [src], {"to": int(to)}, name=f"qdq_cast_{counter}")
        node.outputs[0].name = f"{src.name}_qdq_cast{counter}"
        g.append(node)  # placed by the sort below
        return node.outputs[0]

    for node in list(g):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for scale in node.inputs[1:2]:
            _to_fp16_initializer(scale)
        if node.op_type == "QuantizeLinear":
            x = node.inputs[0]
            src = x.producer()
            if x.is_initializer():
                _to_fp16_initializer(x)
            elif src is not None and src.op_type == "Cast" and src.inputs[0] not in fp32:
                node.replace_input_with(0, src.inputs[0])  # bypass the fp16->fp32 Cast the pass inserted
                if not x.uses() and not x.is_graph_output():
                    g.remove(src, safe=True)
            elif x in fp32:
                node.replace_input_with(0, cast(x, ir.DataType.FLOAT16))
        else:
            y = node.outputs[0]
            for c in list(dict.fromkeys(c for c, _ in y.uses())):
                folds = c.op_type == "Cast" and graph.cast_to(c) == ir.DataType.FLOAT16
                if folds and not c.outputs[0].is_graph_output():
                    # Its consumers read the DequantizeLinear output directly.
                    c.outputs[0].replace_all_uses_with(y)
                    g.remove(c, safe=True)
                elif c.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                    fp32_view = cast(y, ir.DataType.FLOAT)
                    for k, v in enumerate(c.inputs):
                        if v is y:
                            c.replace_input_with(k, fp32_view)
    g.sort()
    proto = graph.to_proto(m)
    del proto.graph.value_info[:]  # types changed; let the consumers re-infer them
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < FP16_SCALE_OPSET:
            opset.version = FP16_SCALE_OPSET
    return proto


# ---- the make steps -----------------------------------------------------------------------------


def prepared(req: MakeRequest) -> Path:
    """``req.source`` through ``prepare``, made once per run in ``req.work`` and shared by every round."""
    path = req.work / f"{req.tower}.prepared.onnx"
    if not path.exists():
        prepare(req.source, path)
    return path


def cache_path(req: MakeRequest) -> Path:
    """The artifact's calibration cache for this source file, method, calibration data and ONNX Runtime."""
    key = f"{req.source_sha256}|{req.cfg.method}|{req.fingerprint}|{installed('onnxruntime')}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return req.artifact / "calibration" / f"{req.tower}.{req.cfg.method}.{digest}.json"


def calibrate(req: MakeRequest, qdq: Path) -> dict[str, Any]:
    """Write the int8 Q/DQ graph of ``req.tower`` to ``qdq``, keeping ``req.exclude`` unquantized; its
    activation ranges come from the artifact's calibration cache, made on the first call. Returns a report."""
    cache = cache_path(req)
    reused = cache.exists()
    info: dict[str, Any] = {
        "calibration_cache": {"file": cache.relative_to(req.artifact).as_posix(), "reused": reused}
    }
    # A new cache is written by ONNX Runtime in the work directory (it makes it 0600, through
    # mkstemp), then copied into the artifact with the umask's mode, whole or not at all.
    scratch = cache if reused else req.work / cache.name
    with progress.muted_stdout():  # ONNX Runtime's entropy/percentile calibrators print to stdout
        layernorms = quantize(prepared(req), qdq, req.feeds(), method=req.cfg.method, cache=scratch,
                              exclude=req.exclude)
    if not reused:
        atomic_write_bytes(cache, scratch.read_bytes())
    info["layernorm_after_conv_quantized"] = len(layernorms)
    return info


def fp16_elsewhere(req: MakeRequest, qdq: Path) -> dict[str, Any]:
    """Write ``qdq`` to ``req.out`` with what its Q/DQ pairs leave in fp32 converted to fp16 (LayerNorm
    and out-of-range nodes stay fp32) and the Q/DQ folded in fp16: the tail of every "Q/DQ, fp16
    elsewhere" precision. Returns the fp16 pass's report."""
    keep = fp16.ALWAYS_FP32_OPS + ("QuantizeLinear", "DequantizeLinear")
    tmp = req.scratch("fp16pass")
    report = fp16.convert(qdq, tmp, req.feeds(fp16.RANGE_SAMPLES), keep_fp32_ops=keep)
    graph.save(fold_qdq_into_fp16(graph.load(tmp)), req.out)
    return report


def make(req: MakeRequest) -> MadeVariant:
    """The int8 make step: Q/DQ with fp32 elsewhere."""
    return MadeVariant(calibrate(req, req.out), qdq=req.out)


def make_int8_fp16(req: MakeRequest) -> MadeVariant:
    """The int8-fp16 make step: the int8 Q/DQ graph, then fp16 elsewhere."""
    qdq = req.scratch("qdq")
    info = calibrate(req, qdq)
    info["fp16"] = fp16_elsewhere(req, qdq)
    return MadeVariant(info, qdq=qdq)
