"""`clipdeploy triton`: artifact directories -> a Triton Inference Server model repository.

Per artifact (prefix P, the model's name):

- ``P_<tower>_<precision>_<trt|onnx>``: one model per tower variant: ``tensorrt_plan`` for engines
  (one plan per GPU compute capability, through ``cc_model_filenames``), ``onnxruntime_onnx`` for
  ONNX. Inputs and outputs come from the manifest, ``max_batch_size`` from the engine's profile;
  dynamic batching and instance groups are set.
- ``P_preprocess`` (image bytes -> pixels) and ``P_tokenize`` (strings -> ids): Python-backend
  models running clipdeploy's own torch-free preprocessing and tokenizer, vendored with the
  artifact's config and tokenizer files; ``P_normalize_<tower>``: L2 normalization.
- ``P_embed_<tower>_<precision>_<trt|onnx>``: ensembles, raw image bytes or strings in, embeddings
  out; ``P_embed_<tower>``: the same for the variant the runtime would pick.

The repository is written to a temporary directory and moved into place only when complete.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clipdeploy import __version__
from clipdeploy.artifact.manifest import swap_directory
from clipdeploy.artifact.staging import clean_beside, ensure_parent, output_temporaries, reserved
from clipdeploy.errors import UsageError
from clipdeploy.triton.config import TritonConfig
from clipdeploy.triton.plan import Plan, collect, refuse_empty, tensorrt_check
from clipdeploy.triton.readme import readme
from clipdeploy.triton.write import write_plan

__all__ = ["MARKER", "Plan", "TritonConfig", "build_repository", "collect"]

log = logging.getLogger(__name__)

MARKER = "clipdeploy-triton.json"  # at the repository root: what was generated, from what (Triton ignores files there)
MARKER_SCHEMA = "clipdeploy-triton/1"


def _check_output(output: Path, force: bool) -> None:
    if not output.exists():
        return
    if not force:
        raise UsageError(f"output {str(output)!r} already exists; pass --force to replace it, or choose another -o")
    if not output.is_dir() or not ((output / MARKER).is_file() or not any(output.iterdir())):
        raise UsageError(
            f"--force replaces only a repository made by `clipdeploy triton`, and {str(output)!r} is not one "
            f"(no {MARKER}); choose another -o"
        )


def build_repository(cfg: TritonConfig) -> dict[str, Any]:
    """Write a Triton model repository for ``cfg.artifacts``; returns what was written, with warnings."""
    cfg.check()
    output = Path(cfg.output)
    ensure_parent(output)  # mkdir -p, and a killed run's leftovers go (a half-swapped repository comes back)
    clean_beside(output)
    _check_output(output, cfg.force)
    warnings: list[str] = []
    notes: set[str] = set()
    plans = collect(cfg, warnings, notes)
    refuse_empty(cfg, plans)
    trt = tensorrt_check(cfg, plans, warnings)
    with reserved(output.parent, output_temporaries(output)[0]) as work:
        served = [write_plan(cfg, plan, work, warnings) for plan in plans]
        summary = {
            "schema": MARKER_SCHEMA,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "clipdeploy": __version__,
            "artifacts": served,
            "tensorrt": trt,
            "warnings": warnings,
            "notes": sorted(notes),
        }
        (work / MARKER).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        (work / "README.md").write_text(readme(summary, output), encoding="utf-8")
        # `reserved` makes it with the umask's mode: the server (often another user in a container) reads it.
        swap_directory(work, output)
    for w in warnings:
        log.warning("clipdeploy: %s", w)
    summary["path"] = str(output)
    return summary
