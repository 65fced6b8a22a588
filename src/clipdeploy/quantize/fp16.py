"""fp16 mixed precision in the ONNX graph.

The graph keeps its float32 inputs and outputs (the runtime feeds float32 pixels and int64 ids) and
converts what is safe to fp16. It keeps in fp32:
- LayerNormalization, whose variance overflows fp16 on real activations;
- every node that produces, or reads, a value beyond what fp16 can hold, as observed on real
  calibration inputs, with a safety margin for unseen data.
Integer tensors (token ids, the argmax pooling) are never touched: the converter changes float types only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy.deps import require
from clipdeploy.quantize import graph
from clipdeploy.quantize.make import MadeVariant, MakeRequest

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
# Keep a node in fp32 when calibration data already brings it within this fraction of the fp16 limit;
# held-out and production inputs can run hotter than calibration.
RANGE_MARGIN = 0.25
ALWAYS_FP32_OPS = ("LayerNormalization",)
RANGE_SAMPLES = 64  # calibration samples the fp16 pass observes for value ranges


def overflow_nodes(model: Any, ranges: dict[str, float], limit: float) -> list[str]:
    """Nodes that produce or read a float tensor whose observed magnitude exceeds ``limit``."""
    hot = {name for name, m in ranges.items() if not m <= limit}
    return [n.name for n in model.graph.node if hot.intersection(n.output) or hot.intersection(n.input)]


def convert(
    src: Path,
    dst: Path,
    feeds: Iterable[dict[str, np.ndarray]],
    *,
    keep_fp32_ops: tuple[str, ...] = ALWAYS_FP32_OPS,
    keep_fp32_nodes: Iterable[str] = (),
    model: Any | None = None,
) -> dict[str, Any]:
    """Write an fp16 version of ``src`` (or of ``model``, already loaded) to ``dst``; returns a report."""
    require("onnxruntime.transformers.float16", "cpu")
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    ranges = graph.abs_max(src, feeds)
    proto = model if model is not None else graph.load(src)
    hot = overflow_nodes(proto, ranges, FP16_MAX * RANGE_MARGIN)
    kept = sorted(set(hot) | set(keep_fp32_nodes))
    if hot:
        log.info("keeping %d nodes in fp32 for range: %s", len(hot), ", ".join(hot[:8]))
    # op_block_list replaces the converter's default list, so extend it rather than pass ours alone.
    converted = convert_float_to_float16(
        proto,
        keep_io_types=True,
        op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(keep_fp32_ops),
        node_block_list=kept,
        disable_shape_infer=not graph.fits(proto),
    )
    # The converter records fp16 types for initializers it left in fp32 (LayerNorm's weights, say);
    # an initializer carries its own type, so drop those records. The other records stay: without
    # them ONNX Runtime 1.32's full optimization level crashes on some fp16 graphs.
    initializers = {i.name for i in converted.graph.initializer}
    records = [vi for vi in converted.graph.value_info if vi.name not in initializers]
    del converted.graph.value_info[:]
    converted.graph.value_info.extend(records)
    edited = graph.to_ir(converted)
    del converted
    graph.drop_fp16_round_trips(edited)
    edited.graph.sort()  # the converter appends its Casts at the end
    side = graph.save(graph.to_proto(edited), dst)
    peak = max((v for v in ranges.values() if np.isfinite(v)), default=0.0)
    return {
        "fp32_ops": list(keep_fp32_ops),
        "fp32_nodes_for_range": hot,
        "observed_abs_max": peak,
        "side_files": [p.name for p in side],
    }


def make(req: MakeRequest) -> MadeVariant:
    """The fp16 make step: the fp32 graph converted, with ranges observed on calibration samples."""
    return MadeVariant({"fp16": convert(req.source, req.out, req.feeds(RANGE_SAMPLES))})
