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
from clipdeploy.calibration.bundled import sample_images, sample_prompts
from clipdeploy.engines import polygraphy_results as pg
from clipdeploy.errors import ArtifactError, EngineError, UsageError
from clipdeploy.artifact.manifest import Variant, updating_manifest, variant_files, verify_files
from clipdeploy.artifact.view import ArtifactView
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


def sample_inputs(view: ArtifactView) -> dict[str, np.ndarray]:
    """Real inputs per tower: the bundled photographs, preprocessed, and the bundled prompts, tokenized."""
    out = {}
    if "image" in view.towers:
        out["image"] = Preprocessor(PreprocessConfig.from_dict(view.preprocess))(sample_images())
    if "text" in view.towers:
        out["text"] = load_tokenizer(dict(view.tokenizer), view.root)(sample_prompts())
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


def polygraphy_tolerances(
    precision: str, reference: list[dict[str, np.ndarray]], overrides: dict[str, dict[str, float]] | None = None
) -> dict[str, pg.Tolerance | None]:
    """Polygraphy's per-output tolerance for an engine of ``precision``.

    By default atol is the precision's ``max_abs_rel`` times the output's largest reference value (rtol 0),
    the same bound as our own abs-error gate; precisions gated on direction only (int8, fp8) are measured,
    not gated, by Polygraphy. ``overrides`` ({"atol"|"rtol": {OUTPUT or "": value}}, from --atol/--rtol)
    replace that, per output or for all ("")."""
    overrides = overrides or {}
    rel = TOLERANCES[precision].max_abs_rel
    out: dict[str, pg.Tolerance | None] = {}
    for name in reference[0]:
        peak = max(float(np.abs(it[name].astype(np.float64)).max()) for it in reference)
        default = pg.Tolerance(atol=rel * peak, rtol=0.0) if rel is not None else None
        given = {k: v.get(name, v.get("")) for k, v in overrides.items()}
        given = {k: v for k, v in given.items() if v is not None}
        if given:
            base = default or pg.Tolerance(0.0, 0.0)
            out[name] = pg.Tolerance(atol=given.get("atol", base.atol), rtol=given.get("rtol", base.rtol))
        else:
            out[name] = default
    return out


def run_engine(
    engine: Any, tower_inputs: np.ndarray, profile: dict[str, Any]
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """The engine's outputs on the sample inputs at each reference batch size: (inputs, outputs) per batch."""
    (spec,) = engine.inputs
    feeds, outputs = [], []
    for batch in _batches(profile):
        x = _fit(tower_inputs, batch, profile.get(spec.name)).astype(spec.dtype, copy=False)
        feeds.append({spec.name: x})
        outputs.append({k: np.asarray(v, np.float32) for k, v in engine.infer({spec.name: x}).items()})
    return feeds, outputs


def judge(
    run: pg.EngineRun, reference: Any, overrides: dict[str, dict[str, float]] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Compare an engine's saved run with ONNX Runtime on the same inputs: our cosine and abs-error figures
    on the embedding, and Polygraphy's comparator on every output. Returns the figures and the failures."""
    tol = TOLERANCES[run.precision]
    want = []
    for feed in run.inputs:
        got = reference.infer({reference.inputs[0].name: next(iter(feed.values()))})
        want.append({k: np.asarray(v, np.float32) for k, v in got.items()})
    (ref_out,) = reference.outputs
    name = f"{run.tower} {run.precision} engine"
    per_batch, comparisons = {}, []
    for got, ref in zip(run.outputs, want, strict=True):
        if ref_out.name not in got:
            raise ArtifactError(f"the {name} has no output {ref_out.name!r}, which its ONNX source has")
        c = compare(got[ref_out.name], ref[ref_out.name])
        per_batch[str(len(ref[ref_out.name]))] = c.to_dict()
        comparisons.append(c)
    worst = merge(comparisons)
    failures = gate_failures(name, worst, min_cosine=tol.min_cosine, max_abs_rel=tol.max_abs_rel)
    shared = [{k: v for k, v in g.items() if k in r} for g, r in zip(run.outputs, want, strict=True)]
    polygraphy = pg.compare_outputs(shared, want, polygraphy_tolerances(run.precision, want, overrides))
    failures += pg.failures(name, polygraphy)
    record = {**worst.to_dict(), "batches": per_batch, "polygraphy": polygraphy, "tolerance": asdict(tol)}
    return record, failures


def validate_engine(
    view: ArtifactView,
    entry: dict[str, Any],
    inputs: dict[str, np.ndarray],
    device: int,
    host_code_allowed: bool,
    overrides: dict[str, dict[str, float]] | None = None,
) -> tuple[dict[str, Any], list[str], pg.EngineRun]:
    """Compare one engine with its ONNX source; returns the validation record, any failures, and the run."""
    root, tower, precision = view.root, entry["tower"], entry["precision"]
    source = entry["source"]
    options = TrtOptions(device=device, engine_host_code_allowed=host_code_allowed)
    axis_names = {t.name: list(t.shape) for t in view.tower_inputs(tower)}
    engine = TrtRunner(
        root / entry["file"], options, axis_names=axis_names, host_code=bool(entry.get("version_compatible"))
    )
    try:
        feeds, outputs = run_engine(engine, inputs[tower], entry.get("profile") or {})
    finally:
        engine.close()
    run = pg.EngineRun(tower, precision, entry.get("source_sha256", ""), entry["file"], feeds, outputs)
    reference = OrtRunner(root / source, OrtOptions(providers=("CPUExecutionProvider",)))
    figures, failures = judge(run, reference, overrides)
    record = {
        "reference": f"onnxruntime CPUExecutionProvider on {source}",
        "gpu": engine.gpu.name,
        "tensorrt_version": engine.version,
        "validated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **figures,
        "passed": not failures,
    }
    return record, failures, run


def validate_engines(
    artifact: str | Path,
    *,
    device: int = 0,
    files: list[str] | None = None,
    precision: str | None = None,
    engine_host_code_allowed: bool = False,
    save_results: str | Path | None = None,
    tolerances: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Validate every engine in the artifact that can run here (or those in ``files``); record the figures.

    Engines built for another GPU or TensorRT version are reported as skipped. ``save_results`` writes
    every engine's inputs and outputs as Polygraphy RunResults JSON (see :func:`compare_saved`);
    ``tolerances`` overrides Polygraphy's per-output atol/rtol (see :func:`polygraphy_tolerances`). Raises
    AccuracyError when any engine fails, after writing every figure to the manifest (and the results).
    """
    root = Path(artifact)
    view = ArtifactView.read(root)
    engines = [
        v
        for v in view.variants_of(format="tensorrt")
        if (files is None or v.file in files) and (precision is None or v.precision == precision)
    ]
    if not engines:
        which = f"{precision} " if precision else ""
        raise UsageError(
            f"no {which}TensorRT engines to validate in {str(root)!r}; build one with "
            f"`clipdeploy build {root} --precision {precision or precisions.FP16}`"
        )
    trt = import_tensorrt()
    gpu = cuda.gpu_info(device)
    inputs = sample_inputs(view)
    report: dict[str, Any] = {}
    records: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    runs: list[pg.EngineRun] = []
    for v in engines:
        reason = engine_mismatch(v.extra, gpu, str(trt.__version__))
        if reason is not None:
            report[v.file] = {"skipped": f"built for {reason}"}
            continue
        check_compute_capability(v.precision, gpu)
        verify_files(root, variant_files(v))
        entry = {"tower": v.tower, "precision": v.precision, "file": v.file, **v.extra}
        with progress.stage(f"checking {v.file} against its ONNX source") as step:
            record, engine_failures, run = validate_engine(
                view, entry, inputs, device, engine_host_code_allowed, tolerances
            )
            step.note("pass" if not engine_failures else f"{len(engine_failures)} failed")
        records[v.file] = record
        report[v.file] = record
        failures += engine_failures
        runs.append(run)
    if save_results is not None and runs:
        pg.save(Path(save_results), runs)
    if records:
        with updating_manifest(root) as manifest:  # read again: another stage may have written it meanwhile
            for entry in manifest["variants"]:  # a writer under the artifact's lock: it edits the dict it writes
                if entry["file"] in records:
                    entry["validation"] = records[entry["file"]]
    raise_if_failed("engine validation", failures, report)
    return report


def _saved_source(view: ArtifactView, run: pg.EngineRun) -> Variant:
    """The ONNX variant a saved engine run is compared with: the one its engine was built from."""
    root = view.root
    onnx = view.variants_of(run.tower, "onnx")
    # Variants of several precisions may be the same file: prefer the engine's own precision.
    match = sorted((v for v in onnx if v.sha256 == run.source_sha256), key=lambda v: v.precision != run.precision)
    if not match:
        have = ", ".join(f"{v.file} ({v.sha256[:12]}…)" for v in onnx if v.precision == run.precision) or "none"
        raise ArtifactError(
            f"{run.file} was built from a {run.tower} {run.precision} ONNX file with sha256 {run.source_sha256[:12]}…, "
            f"which {str(root)!r} does not have (its {run.precision} {run.tower} variants: {have}); "
            "compare on a copy of the artifact the engine was built from"
        )
    verify_files(root, variant_files(match[0]))
    return match[0]


def compare_saved(
    artifact: str | Path, results: str | Path, tolerances: dict[str, dict[str, float]] | None = None
) -> dict[str, Any]:
    """Compare engine outputs saved by ``validate_engines(save_results=...)`` with ONNX Runtime here.

    Needs neither TensorRT nor a GPU: the saved inputs run through each engine's ONNX source (found by
    its sha256) on ONNX Runtime CPU. Reads the manifest, writes nothing. Raises AccuracyError on a failure.
    """
    root = Path(artifact)
    view = ArtifactView.read(root)
    report: dict[str, Any] = {}
    failures: list[str] = []
    for run in pg.load(Path(results)):
        source = _saved_source(view, run)
        with progress.stage(f"checking saved {run.file} against {source.file}") as step:
            reference = OrtRunner(root / source.file, OrtOptions(providers=("CPUExecutionProvider",)))
            figures, engine_failures = judge(run, reference, tolerances)
            step.note("pass" if not engine_failures else f"{len(engine_failures)} failed")
        report[run.file] = {
            "reference": f"onnxruntime CPUExecutionProvider on {source.file}",
            "results": str(results),
            **figures,
            "passed": not engine_failures,
        }
        failures += engine_failures
    raise_if_failed("engine validation of saved results", failures, report)
    return report
