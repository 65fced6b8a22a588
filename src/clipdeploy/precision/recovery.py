"""Per-node int8 sensitivity, for the automatic recovery of a variant that misses its gate.

A node's sensitivity is the relative error that quantizing its inputs introduces, measured on real
calibration activations with the very scales the Q/DQ model uses: for activations
``||x - dq(q(x))|| / ||x||`` with the per-tensor scale, for weights the same with the per-channel
scales. Outlier channels in an activation, the classic int8 failure of trained transformers, blow
up exactly this figure for the nodes that read them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy.precision import graph
from clipdeploy.precision.int8 import OPS_TO_QUANTIZE


def _fake_quant(x: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    s = scale.astype(np.float64)
    if axis is not None and s.ndim == 1 and s.size > 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        s = s.reshape(shape)
    return np.clip(np.round(x / s), -128, 127) * s


def _rel_err(x: np.ndarray, scale: np.ndarray, axis: int | None) -> float:
    x = x.astype(np.float64)
    norm = np.linalg.norm(x)
    return float(np.linalg.norm(x - _fake_quant(x, scale, axis)) / norm) if norm > 0 else 0.0


def rank_nodes(qdq_path: Path, fp32_path: Path, feeds: Sequence[dict[str, np.ndarray]]) -> list[tuple[str, float]]:
    """Quantized nodes of ``qdq_path``, most sensitive first, with their scores."""
    from onnx import numpy_helper

    model = graph.load(qdq_path)
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    weights: dict[str, float] = {}
    activations: dict[str, list[tuple[str, np.ndarray]]] = {}  # tensor -> [(node, scale)]
    for node in model.graph.node:
        if node.op_type not in OPS_TO_QUANTIZE:
            continue
        for inp in node.input:
            dq = producers.get(inp)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producers.get(dq.input[0])
            axis = next((a.i for a in dq.attribute if a.name == "axis"), None)
            if q is None and dq.input[0] in inits:  # int8 weights stored directly
                continue
            if q is None or q.op_type != "QuantizeLinear":
                continue
            source, scale = q.input[0], array(q.input[1])
            if source in inits:
                w_err = _rel_err(array(source), scale, axis if axis is not None else 1)
                weights[node.name] = weights.get(node.name, 0.0) + w_err
            else:
                activations.setdefault(source, []).append((node.name, scale))
    del model
    scores = dict(weights)
    sums: dict[str, float] = {}
    count = 0
    for values in graph.observe(fp32_path, list(activations), feeds):
        count += 1
        for tensor, users in activations.items():
            x = values[tensor]
            for node_name, scale in users:
                sums[node_name] = sums.get(node_name, 0.0) + _rel_err(x, scale, None)
    for node_name, total in sums.items():
        scores[node_name] = scores.get(node_name, 0.0) + total / max(count, 1)
    return sorted(scores.items(), key=lambda kv: -kv[1])


def schedule(bound: int, rounds: int) -> list[int]:
    """How many nodes to keep in higher precision in each round: growing geometrically up to ``bound``."""
    if bound < 1 or rounds < 1:
        return []
    steps = sorted({min(bound, 2**i) for i in range(rounds - 1)} | {bound})
    return steps[-rounds:] if len(steps) > rounds else steps


def bound_for(quantizable: int, fraction: float) -> int:
    return int(math.floor(quantizable * fraction + 1e-9))


def describe(ranked: list[tuple[str, float]], kept: int) -> list[dict[str, Any]]:
    return [{"node": name, "sensitivity": round(score, 6)} for name, score in ranked[:kept]]
