"""Engine validation: each TensorRT engine against its ONNX source on ONNX Runtime CPU, on the GPU it runs on.

Precision lives in the ONNX graph and was gated on CPU already, so this measures only what TensorRT
adds: kernel-level differences. The figures go into the engine's manifest entry; a failure is an
AccuracyError, never a warning.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy import precisions, progress
from clipdeploy.bundled import sample_images, sample_prompts
from clipdeploy.errors import EngineError, UsageError
from clipdeploy.manifest import read_manifest, variant_files, variants, verify_files, write_manifest
from clipdeploy.runtime import cuda
from clipdeploy.runtime.backends.onnxruntime import OrtOptions, OrtRunner
from clipdeploy.runtime.backends.tensorrt import TrtOptions, TrtRunner
from clipdeploy.runtime.preprocess import PreprocessConfig, Preprocessor
from clipdeploy.runtime.tensorrt_compat import engine_mismatch, import_tensorrt
from clipdeploy.runtime.text import load_tokenizer
from clipdeploy.validation import compare, gate_failures, merge, raise_if_failed

log = logging.getLogger(__name__)

# Reference batches are capped: ONNX Runtime on CPU is the slow side of the comparison.
MAX_REFERENCE_BATCH = 32


@dataclass(frozen=True)
class EngineTolerance:
    """How close an engine must be to its own ONNX source."""

    min_cosine: float  # lowest cosine similarity allowed for any single embedding
    max_abs_rel: float | None  # largest abs error as a fraction of the largest reference value; None: not gated


# TF32 (on by default) puts fp32 engines near 1e-3 relative error. int8 kernels round differently from
# ONNX Runtime's integer ops, so for them only the direction of the embedding is gated.
# The values live in each precision's spec (clipdeploy.precisions); this is a live view of them.
TOLERANCES = precisions.view(lambda spec: EngineTolerance(**spec.engine_tolerance))


def sample_inputs(root: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """Real inputs per tower: the bundled photographs, preprocessed, and the bundled prompts, tokenized."""
    out = {}
    if "image" in manifest["towers"]:
        out["image"] = Preprocessor(PreprocessConfig.from_dict(manifest["preprocess"]))(sample_images())
    if "text" in manifest["towers"]:
        out["text"] = load_tokenizer(manifest["tokenizer"], root)(sample_prompts())
    return out


def _batches(profile: dict[str, Any]) -> list[int]:
    batch = [v for v in profile.values() if v.get("min")]
    if not batch:
        return [1]
    lo, opt, hi = batch[0]["min"][0], batch[0]["opt"][0], min(batch[0]["max"][0], MAX_REFERENCE_BATCH)
    return sorted({max(lo, 1), opt if opt <= hi else hi, hi})


def _fit(x: np.ndarray, batch: int, profile: dict[str, Any] | None) -> np.ndarray:
    """``x`` repeated or cut to ``batch`` rows, and its other axes cut to the profile's max."""
    rows = np.resize(x, (batch, *x.shape[1:])) if len(x) != batch else x
    if profile:
        limits = tuple(slice(0, m) for m in profile["max"][1:])
        rows = rows[(slice(None), *limits)]
    return np.ascontiguousarray(rows)


def check_compute_capability(precision: str, gpu: cuda.GpuInfo) -> None:
    """Refuse, in one line, a precision whose engines this GPU cannot run (fp8 needs 8.9: Ada and newer)."""
    need = precisions.get(precision).min_compute_capability
    if need is not None and tuple(gpu.compute_capability) < tuple(need):
        raise EngineError(
            f"{precision} engines need compute capability {need[0]}.{need[1]} or higher (Ada, Hopper, Blackwell); "
            f"GPU {gpu.index} ({gpu.name}) is {gpu.cc}: use --precision int8-fp16 or fp16 on this GPU"
        )


def validate_engine(
    root: Path, entry: dict[str, Any], inputs: dict[str, np.ndarray], device: int, host_code_allowed: bool
) -> tuple[dict[str, Any], list[str]]:
    """Compare one engine with its ONNX source; returns the validation record and any failures."""
    tower, precision = entry["tower"], entry["precision"]
    tol = TOLERANCES[precision]
    source = entry["source"]
    options = TrtOptions(device=device, engine_host_code_allowed=host_code_allowed)
    axis_names = {t["name"]: t["shape"] for t in read_manifest(root)["towers"][tower].get("inputs", [])}
    engine = TrtRunner(
        root / entry["file"], options, axis_names=axis_names, host_code=bool(entry.get("version_compatible"))
    )
    try:
        reference = OrtRunner(root / source, OrtOptions(providers=("CPUExecutionProvider",)))
        (spec,) = engine.inputs
        (out,) = engine.outputs
        per_batch, comparisons = {}, []
        profile = entry.get("profile") or {}
        for batch in _batches(profile):
            x = _fit(inputs[tower], batch, profile.get(spec.name))
            x = x.astype(spec.dtype, copy=False)
            got = engine.infer({spec.name: x})[out.name]
            (ref_out,) = reference.outputs
            want = reference.infer({reference.inputs[0].name: x})[ref_out.name]
            c = compare(got.astype(np.float32), want.astype(np.float32))
            per_batch[str(batch)] = c.to_dict()
            comparisons.append(c)
    finally:
        engine.close()
    worst = merge(comparisons)
    failures = gate_failures(
        f"{tower} {precision} engine", worst, min_cosine=tol.min_cosine, max_abs_rel=tol.max_abs_rel
    )
    record = {
        "reference": f"onnxruntime CPUExecutionProvider on {source}",
        "gpu": engine.gpu.name,
        "tensorrt_version": engine.version,
        "validated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **worst.to_dict(),
        "batches": per_batch,
        "tolerance": asdict(tol),
        "passed": not failures,
    }
    return record, failures


def validate_engines(
    artifact: str | Path,
    *,
    device: int = 0,
    files: list[str] | None = None,
    precision: str | None = None,
    engine_host_code_allowed: bool = False,
) -> dict[str, Any]:
    """Validate every engine in the artifact that can run here (or those in ``files``); record the figures.

    Engines built for another GPU or TensorRT version are reported as skipped. Raises AccuracyError
    when any engine fails, after writing every figure to the manifest.
    """
    root = Path(artifact)
    manifest = read_manifest(root)
    engines = [
        v
        for v in variants(manifest)
        if v.format == "tensorrt"
        and (files is None or v.file in files)
        and (precision is None or v.precision == precision)
    ]
    if not engines:
        which = f"{precision} " if precision else ""
        raise UsageError(
            f"no {which}TensorRT engines to validate in {str(root)!r}; build one with "
            f"`clipdeploy build {root} --precision {precision or precisions.FP16}`"
        )
    trt = import_tensorrt()
    gpu = cuda.gpu_info(device)
    inputs = sample_inputs(root, manifest)
    report: dict[str, Any] = {}
    records: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for v in engines:
        reason = engine_mismatch(v.extra, gpu, str(trt.__version__))
        if reason is not None:
            report[v.file] = {"skipped": f"built for {reason}"}
            continue
        check_compute_capability(v.precision, gpu)
        verify_files(root, variant_files(v))
        entry = {"tower": v.tower, "precision": v.precision, "file": v.file, **v.extra}
        with progress.stage(f"checking {v.file} against its ONNX source") as step:
            record, engine_failures = validate_engine(root, entry, inputs, device, engine_host_code_allowed)
            step.note("pass" if not engine_failures else f"{len(engine_failures)} failed")
        records[v.file] = record
        report[v.file] = record
        failures += engine_failures
    if records:
        # Read again: another stage may have written the manifest meanwhile.
        manifest = read_manifest(root)
        for entry in manifest["variants"]:
            if entry["file"] in records:
                entry["validation"] = records[entry["file"]]
        write_manifest(root, manifest)
    raise_if_failed("engine validation", failures, report)
    return report
