"""Trace one tower to ONNX with torch.onnx's dynamo exporter, and check the file."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipdeploy.deps import require
from clipdeploy.errors import ExportError
from clipdeploy.export.geometry import TowerGeometry
from clipdeploy.export.specs import BATCH, MIN_SEQUENCE, SEQUENCE, TensorSpec, TowerSpec

log = logging.getLogger(__name__)

# protobuf cannot serialize a message over 2 GiB; stay well below it and move weights to a side file.
EXTERNAL_DATA_THRESHOLD = 1_500_000_000
# The largest batch the exported graph promises to handle; runtime batches beyond it are split.
MAX_EXPORT_BATCH = 4096


@dataclass
class ExportedTower:
    """An ONNX file written for one tower."""

    spec: TowerSpec
    input: TensorSpec  # the graph input it was traced with; a str in its shape is a named dynamic axis
    path: Path
    external_data: list[Path]
    seconds: float
    weight_bytes: int


def tower_parameters(model: Any, tower: str) -> list[Any]:
    """The parameters a tower's forward uses: the visual module, or everything else (minus logit terms)."""
    visual = {id(p) for p in model.visual.parameters()}
    if tower == "image":
        return list(model.visual.parameters())
    skip = {id(getattr(model, n)) for n in ("logit_scale", "logit_bias") if getattr(model, n, None) is not None}
    return [p for p in model.parameters() if id(p) not in visual and id(p) not in skip]


# The example length of a dynamic text axis: not 0, 1 or the maximum, which torch.export specializes on.
EXAMPLE_SEQUENCE = 8


def example_input(boundary: TensorSpec, vocab_size: int | None, batch: int = 2) -> Any:
    """A traceable example of the graph input ``boundary``. Values do not matter for tracing; shapes and dtypes do."""
    torch = require("torch", "export")

    sizes = {BATCH: batch, SEQUENCE: EXAMPLE_SEQUENCE}
    shape = [sizes.get(d, d) if isinstance(d, str) else d for d in boundary.shape]
    if boundary.dtype == "int64":
        # SOT, a few word ids, EOT, then padding, in range for any vocabulary: the pooling sees a
        # realistic sequence. Values below 5 exist in every vocabulary the families use.
        vocab = vocab_size or 49408
        ids = torch.zeros(shape, dtype=torch.int64)
        ids[:, 0] = min(49406, vocab - 2)
        ids[:, 1:4] = torch.tensor([320, 1125, 539]) % max(vocab - 2, 1)
        ids[:, 4] = min(49407, vocab - 1)
        return ids
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def dynamic_axes(boundary: TensorSpec, context_length: int) -> dict[int, Any]:
    """torch.export dims for the named axes of the graph input ``boundary``, from the one TensorSpec."""
    torch = require("torch", "export")

    dims = {
        BATCH: torch.export.Dim(BATCH, min=1, max=MAX_EXPORT_BATCH),
        SEQUENCE: torch.export.Dim(SEQUENCE, min=MIN_SEQUENCE, max=context_length),
    }
    return {i: dims[d] for i, d in enumerate(boundary.shape) if isinstance(d, str)}


def export_tower(spec: TowerSpec, model: Any, geometry: TowerGeometry, path: Path, *, opset: int) -> ExportedTower:
    """Write ``path`` (and a ``.data`` side file for large towers), then run the ONNX checker on it."""
    onnx = require("onnx", "export")
    torch = require("torch", "export")

    boundary = spec.input_spec(geometry)
    wrapper = spec.wrap(model, geometry)
    example = example_input(boundary, geometry.vocab_size)
    weight_bytes = sum(p.numel() * p.element_size() for p in tower_parameters(model, spec.tower))
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    axes = dynamic_axes(boundary, geometry.context_length)
    start = time.perf_counter()
    # torch.onnx prints its progress to stdout; keep it for --verbose, and out of JSON-printing commands.
    chatter = io.StringIO()
    quiet = contextlib.nullcontext() if log.isEnabledFor(logging.INFO) else contextlib.redirect_stdout(chatter)
    try:
        with quiet, torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                (example,),
                input_names=[spec.input_name],
                output_names=[spec.output_name],
                dynamic_shapes=(axes,),
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
        program.save(str(path), external_data=external)
    except Exception as e:
        raise ExportError(
            f"torch.onnx could not export the {spec.tower} tower ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]}); rerun with --verbose for the trace"
        ) from e
    seconds = time.perf_counter() - start
    side_files = sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name) and p != path)
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as e:
        raise ExportError(f"the exported {spec.tower} tower fails onnx.checker ({e}); rerun with --verbose") from e
    log.info("exported %s tower to %s in %.1fs", spec.tower, path.name, seconds)
    return ExportedTower(spec, boundary, path, side_files, seconds, weight_bytes)
