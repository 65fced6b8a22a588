"""Per-node int8 sensitivity, for the automatic recovery of a variant that misses its gate.

A node's sensitivity is the relative error that quantizing its inputs causes in its own output,
``||node(x, W) - node(q(x), q(W))|| / ||node(x, W)||``, measured on real calibration activations with
the very scales the Q/DQ model uses. Each node runs alone, as a one-node ONNX model, so the measure
works for any op (MatMul, Gemm, Conv) and ignores the error that reaches it from upstream.
Outlier channels, the classic int8 failure of trained transformers, blow this figure up for exactly
the nodes that read them: the per-tensor scale spans the outliers and crushes every other channel.

A node can also be harmless on average and ruin a few samples (one whose activations the shared
scale clips, or leaves with a handful of levels). So each feed (one sample) is scored on its own,
and a node's score is the mean of its overall error and of its error on its worst feeds: a node
that loses a few samples ranks beside one that blurs them all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy.deps import require
from clipdeploy.quantize import graph
from clipdeploy.quantize.int8 import OPS_TO_QUANTIZE


def _fake_quant(x: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    s = scale.astype(np.float64)
    if axis is not None and s.ndim == 1 and s.size > 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        s = s.reshape(shape)
    return (np.clip(np.round(x / s), -128, 127) * s).astype(x.dtype)


@dataclass
class _QuantizedInput:
    index: int  # position among the node's inputs
    source: str  # the fp32 tensor the QuantizeLinear reads (a compact weight: its int8 initializer)
    scale: np.ndarray
    axis: int | None
    constant: bool  # a weight (initializer) rather than an activation


def _quantized_nodes(model: Any) -> dict[str, tuple[Any, list[_QuantizedInput]]]:
    """Each named MatMul/Gemm/Conv whose inputs read a QuantizeLinear→DequantizeLinear pair or an int8
    weight → DequantizeLinear, with those inputs. Unnamed nodes are left out: recovery keeps nodes in fp32 by name, and ONNX Runtime
    excludes nodes from quantization by name too."""
    found = {}
    for node in graph.to_ir(model).graph:
        if node.op_type not in OPS_TO_QUANTIZE or not node.name:
            continue
        inputs = []
        for k, value in enumerate(node.inputs):
            dq = value.producer() if value is not None else None
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = dq.inputs[0].producer()
            if q is not None and q.op_type == "QuantizeLinear":  # an activation, or an fp32 weight with its pair
                scaled, source = q, q.inputs[0]
            elif q is None and dq.inputs[0].is_initializer():  # a compact weight: int8 initializer → DQ
                scaled, source = dq, dq.inputs[0]
            else:
                continue
            axis = scaled.attributes.get_int("axis")
            scale = scaled.inputs[1].const_value.numpy()
            per_channel = axis if scale.size > 1 else None
            inputs.append(_QuantizedInput(k, source.name, scale, per_channel, source.is_initializer()))
        if inputs:
            found[node.name] = (node, inputs)
    return found


def _single_node_model(node: Any, original: dict[str, Any], tensors: list[str]) -> bytes:
    """``node`` alone, reading its activations as graph inputs and its constants as initializers."""
    require("onnx", "export")
    from onnx import helper

    inputs = [helper.make_tensor_value_info(t, 1, None) for t in tensors]
    inits = [original[name] for name in node.input if name in original]
    copy = helper.make_node(node.op_type, list(node.input), ["y"], name=node.name)
    copy.attribute.extend(node.attribute)
    out = helper.make_tensor_value_info("y", 1, None)
    g = helper.make_graph([copy], "single", inputs, [out], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model.SerializeToString()


def worst_k(feeds: int) -> int:
    """How many of a node's worst feeds its worst-case figure averages: about one in eight, at least 2."""
    return max(2, feeds // 8)


def combine(errors: Sequence[tuple[float, float]]) -> float:
    """A node's score from its (squared error, squared reference) per feed: the mean of the overall
    relative error and the mean relative error of its ``worst_k`` worst feeds."""
    err = sum(e for e, _ in errors)
    ref = sum(r for _, r in errors)
    overall = math.sqrt(err / ref) if ref > 0 else 0.0
    per_feed = sorted((math.sqrt(e / r) if r > 0 else 0.0 for e, r in errors), reverse=True)
    worst = per_feed[: worst_k(len(per_feed))]
    return (overall + sum(worst) / len(worst)) / 2 if worst else overall


def rank_nodes(qdq_path: Path, fp32_path: Path, feeds: Sequence[dict[str, np.ndarray]]) -> list[tuple[str, float]]:
    """Quantized nodes of ``qdq_path``, most sensitive first, with their scores (see ``combine``).

    Give one sample per feed, so that the worst-case part of the score is per sample."""
    ort = require("onnxruntime", "cpu")
    require("onnx", "export")
    from onnx import numpy_helper

    qdq = graph.load(qdq_path)
    nodes = _quantized_nodes(qdq)
    del qdq
    fp32 = graph.load(fp32_path)
    original = {i.name: i for i in fp32.graph.initializer}
    fp32_nodes = {n.name: n for n in fp32.graph.node}
    del fp32
    wanted = sorted({qi.source for _, qis in nodes.values() for qi in qis if not qi.constant} |
                    {i for name in nodes if name in fp32_nodes for i in fp32_nodes[name].input if i and i not in original})
    observed: list[dict[str, np.ndarray]] = list(graph.observe(fp32_path, wanted, feeds))
    scores: dict[str, float] = {}
    for name, (_, qinputs) in nodes.items():
        node = fp32_nodes.get(name)
        if node is None:
            continue
        activations = list(dict.fromkeys(i for i in node.input if i and i not in original))
        session = ort.InferenceSession(_single_node_model(node, original, activations),
                                       providers=["CPUExecutionProvider"])
        quant = {qi.index: qi for qi in qinputs}
        weights = {
            node.input[k]: _fake_quant(numpy_helper.to_array(original[node.input[k]]), qi.scale, qi.axis)
            for k, qi in quant.items() if qi.constant
        }
        fake = _single_node_model(node, {**original, **{k: numpy_helper.from_array(v, k) for k, v in weights.items()}},
                                  activations)
        fake_session = ort.InferenceSession(fake, providers=["CPUExecutionProvider"])
        errors: list[tuple[float, float]] = []
        for values in observed:
            feed = {a: values[a] for a in activations}
            qfeed = dict(feed)
            for k, qi in quant.items():
                if not qi.constant:
                    qfeed[node.input[k]] = _fake_quant(feed[node.input[k]], qi.scale, qi.axis)
            (y,) = session.run(None, feed)
            (yq,) = fake_session.run(None, qfeed)
            errors.append((float(np.sum((y.astype(np.float64) - yq) ** 2)), float(np.sum(y.astype(np.float64) ** 2))))
        scores[name] = combine(errors)
    return sorted(scores.items(), key=lambda kv: -kv[1])


def schedule(bound: int, rounds: int) -> list[int]:
    """How many nodes to keep in higher precision in each round: growing geometrically up to ``bound``."""
    if bound < 1 or rounds < 1:
        return []
    steps = sorted({min(bound, 2**i) for i in range(rounds - 1)} | {bound})
    return steps[-rounds:] if len(steps) > rounds else steps


def bound_for(quantizable: int, fraction: float) -> int:
    return int(math.floor(quantizable * fraction + 1e-9))


def module_scopes(fp32_path: Path) -> dict[str, str]:
    """ONNX node name -> the PyTorch module it came from, as the dynamo exporter records it."""
    import ast

    onnx = require("onnx", "export")

    scopes = {}
    for n in onnx.load(str(fp32_path), load_external_data=False).graph.node:
        for prop in n.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes":
                try:
                    path = ast.literal_eval(prop.value)
                except (ValueError, SyntaxError):
                    continue
                # The deepest module ("model.visual...mlp.c_fc"); the last entry names the op itself.
                modules = [str(p) for p in path if str(p).startswith("model.")]
                scopes[n.name] = modules[-1].removeprefix("model.") if modules else ""
    return scopes


def describe(ranked: list[tuple[str, float]], kept: int, scopes: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {"node": name, "module": scopes.get(name, ""), "sensitivity": round(score, 6)} for name, score in ranked[:kept]
    ]
