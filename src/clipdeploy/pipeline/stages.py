"""The pipeline's stage units and what each depends on.

A model expands into units: ``export``, ``quantize:<p>`` for each reduced precision, ``build:<p>`` and
``validate:<p>`` for each precision, then ``bench``. Each stage says:

- ``inputs(unit, ctx)``: everything its outputs depend on (hashed into the unit's key). It raises
  :class:`Unavailable` when the unit cannot run on this machine (build without TensorRT or a GPU);
- ``run(unit, ctx)``: do the work through the stage's own API; returns the files it produced (relative
  to the model's directory, with sha256 and size) and its key figures;
- ``current(unit, ctx, record)``: whether a recorded run's outputs are still there, unchanged.

Heavy imports (torch, onnx, onnxruntime, tensorrt) stay inside ``run``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipdeploy import __version__
from clipdeploy.benchmarks import environment
from clipdeploy.benchmarks.bench import resolve_device, run_bench
from clipdeploy.engines import build_engines, validate_engines
from clipdeploy.engines.validate import TOLERANCES
from clipdeploy.errors import DependencyError
from clipdeploy.export.exporter import export_model
from clipdeploy.artifact.manifest import file_sha256
from clipdeploy.artifact.view import ArtifactView
from clipdeploy.pipeline.config import ARTIFACT_DIR, ModelPlan
from clipdeploy.pipeline.fingerprint import config_values, image_sources_digest
from clipdeploy.pipeline.state import StageState
from clipdeploy.quantize.stage import quantize
from clipdeploy.precisions import REFERENCE
from clipdeploy.runtime import cuda
from clipdeploy.runtime.tensorrt_compat import import_tensorrt
from clipdeploy.artifact.tool_versions import versions


@dataclass(frozen=True)
class Unit:
    """One step of one model: a stage, and the precision it works on (None for export and bench)."""

    stage: str
    precision: str | None = None

    @property
    def id(self) -> str:
        return f"{self.stage}:{self.precision}" if self.precision else self.stage


@dataclass(frozen=True)
class Dep:
    """A unit this one builds on. A hard dependency must have produced its outputs; a soft one may be skipped."""

    unit: Unit
    hard: bool = True


class Unavailable(Exception):
    """This unit cannot run on this machine (no TensorRT, no GPU); the message says why and what to install."""


@dataclass
class Context:
    """What a stage sees of the run: the model plan, the keys of units already settled, the stage state."""

    plan: ModelPlan
    state: StageState
    keys: dict[str, str] = field(default_factory=dict)  # unit id -> key, for units that ran or are current


@dataclass
class Result:
    """What a unit produced."""

    outputs: dict[str, dict[str, Any]]  # path relative to the model dir -> {"sha256", "bytes"}
    figures: dict[str, Any]  # key figures for the summary


def units(plan: ModelPlan) -> list[Unit]:
    """The model's units in run order."""
    out = [Unit("export")]
    out += [Unit("quantize", p) for p in plan.precisions if p != REFERENCE]
    out += [Unit("build", p) for p in plan.precisions]
    out += [Unit("validate", p) for p in plan.precisions]
    out.append(Unit("bench"))
    return out


def deps(unit: Unit, plan: ModelPlan) -> list[Dep]:
    if unit.stage == "quantize":
        return [Dep(Unit("export"))]
    if unit.stage == "build":
        return [Dep(Unit("export") if unit.precision == REFERENCE else Unit("quantize", unit.precision))]
    if unit.stage == "validate":
        return [Dep(Unit("build", unit.precision))]
    if unit.stage == "bench":
        # Bench measures whatever variants exist: engines that could not be built here are no reason to stop.
        return [Dep(Unit("export"))] + [
            Dep(u, hard=u.stage == "quantize") for u in units(plan) if u.stage in ("quantize", "validate")
        ]
    return []


# ---- outputs ---------------------------------------------------------------------------------------


def _artifact_rel(rel: str) -> str:
    return f"{ARTIFACT_DIR}/{rel}"


def _manifest_sums(view: ArtifactView) -> dict[str, str]:
    sums = dict(view.files)
    for v in view.variants:
        sums[v.file] = v.sha256
        sums.update(zip(v.external_data, v.external_sha256, strict=True))
    return sums


def describe_files(root: Path, rels: list[str], view: ArtifactView | None = None) -> dict[str, dict[str, Any]]:
    """{rel: {sha256, bytes}} for files under ``root``; artifact files take their sum from the manifest."""
    sums = _manifest_sums(view) if view is not None else {}
    out = {}
    for rel in rels:
        path = root / rel
        inner = rel[len(ARTIFACT_DIR) + 1 :] if rel.startswith(ARTIFACT_DIR + "/") else None
        sha = sums.get(inner) if inner is not None else None
        out[rel] = {"sha256": sha or file_sha256(path), "bytes": path.stat().st_size}
    return out


def outputs_intact(plan: ModelPlan, outputs: dict[str, dict[str, Any]]) -> bool:
    """Every recorded output is there with its size, and the manifest (or the file) still has its sha256.

    Artifact files are checked against the manifest, not re-hashed: a second run must take seconds,
    and every consumer of the artifact verifies the sums anyway.
    """
    try:
        view = ArtifactView.read(plan.artifact)
    except Exception:  # noqa: BLE001 - any unreadable manifest means: not current
        return False
    sums = _manifest_sums(view)
    for rel, meta in outputs.items():
        path = plan.root / rel
        if not path.is_file() or path.stat().st_size != meta.get("bytes"):
            return False
        if rel.startswith(ARTIFACT_DIR + "/"):
            if sums.get(rel[len(ARTIFACT_DIR) + 1 :]) != meta.get("sha256"):
                return False
        elif file_sha256(path) != meta.get("sha256"):
            return False
    return True


def _tools(*dists: str) -> dict[str, str | None]:
    return {"clipdeploy": __version__, **versions(*dists)}


# ---- export ----------------------------------------------------------------------------------------


class ExportStage:
    """open_clip model -> validated fp32 ONNX artifact (`clipdeploy export`)."""

    name = "export"

    def inputs(self, unit: Unit, ctx: Context) -> dict[str, Any]:
        cfg = ctx.plan.export
        random = not cfg.pretrained and cfg.checkpoint is None
        # The seed matters only for random weights. Paths (checkpoint, model config, ...) count by content.
        return {
            **config_values(cfg, exclude=("output", "force", *(() if random else ("seed",)))),
            "tools": _tools("torch", "open_clip_torch", "onnx", "onnxscript"),
        }

    def run(self, unit: Unit, ctx: Context) -> Result:
        view = ArtifactView.of(ctx.plan.artifact, export_model(ctx.plan.export))
        rels = [_artifact_rel(v.file) for v in view.variants]
        rels += [_artifact_rel(f) for v in view.variants for f in v.external_data]
        rels += [_artifact_rel(f) for f in view.files]
        report = view.validation("export")
        figures = {
            t: {"min_cosine": report[t]["min_cosine"], "max_abs_err": report[t]["max_abs_err"]} for t in view.towers
        }
        return Result(describe_files(ctx.plan.root, rels, view), {"vs_pytorch": figures})

    def current(self, unit: Unit, ctx: Context, record: dict[str, Any]) -> bool:
        return outputs_intact(ctx.plan, record.get("outputs") or {})

    @staticmethod
    def describe(figures: dict[str, Any]) -> str:
        vs = figures.get("vs_pytorch") or {}
        return "min cos vs PyTorch " + ", ".join(f"{t} {f['min_cosine']:.7f}" for t, f in vs.items()) if vs else ""


# ---- quantize --------------------------------------------------------------------------------------


def _variant_rels(view: ArtifactView, precision: str, fmt: str) -> list[str]:
    chosen = [v for v in view.variants_of(format=fmt) if v.precision == precision]
    return [_artifact_rel(f) for v in chosen for f in (v.file, *v.external_data)]


def gate_figures(report: dict[str, Any]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for tower in ("image", "text"):
        if isinstance(report.get(tower), dict) and "min_cosine" in report[tower]:
            figures[tower] = {
                k: report[tower][k] for k in ("min_cosine", "p1_cosine", "mean_cosine", "worst") if k in report[tower]
            }
    if "top1_agreement" in report:
        figures["top1_agreement"] = report["top1_agreement"]
        figures["top1_enforced"] = report.get("top1_enforced")
    if report.get("failures"):
        figures["failures"] = report["failures"]
    return figures


class QuantizeStage:
    """fp32 ONNX -> gated fp16 / int8 / int8-fp16 ONNX (`clipdeploy quantize`)."""

    name = "quantize"

    def inputs(self, unit: Unit, ctx: Context) -> dict[str, Any]:
        cfg = ctx.plan.quantize[unit.precision]
        return {
            "export": ctx.keys["export"],
            **config_values(cfg, exclude=("artifact", "force", "threads", "calib_images")),
            "calib_images": image_sources_digest(cfg.calib_images),
            "tools": _tools("onnx", "onnxruntime", "numpy"),
        }

    def run(self, unit: Unit, ctx: Context) -> Result:
        report = quantize(ctx.plan.quantize[unit.precision])
        view = ArtifactView.read(ctx.plan.artifact)
        rels = _variant_rels(view, unit.precision or "", "onnx")
        return Result(describe_files(ctx.plan.root, rels, view), gate_figures(report))

    def current(self, unit: Unit, ctx: Context, record: dict[str, Any]) -> bool:
        return bool(record.get("outputs")) and outputs_intact(ctx.plan, record["outputs"])

    @staticmethod
    def describe(figures: dict[str, Any]) -> str:
        parts = [f"{t} min cos {figures[t]['min_cosine']:.5f}" for t in ("image", "text") if t in figures]
        if "top1_agreement" in figures:
            parts.append(
                f"top-1 {figures['top1_agreement']:.3f}{'' if figures.get('top1_enforced') else ' (not gated)'}"
            )
        return ", ".join(parts)


# ---- build and validate (TensorRT) ----------------------------------------------------------------


_TARGETS: dict[int, dict[str, Any]] = {}


def tensorrt_target(device: int) -> dict[str, Any]:
    """The TensorRT version and GPU that engines would be built for here; Unavailable when there are none."""
    if device not in _TARGETS:
        try:
            trt = import_tensorrt()
            gpu = cuda.gpu_info(device)
        except DependencyError as e:
            raise Unavailable(str(e)) from e
        _TARGETS[device] = {
            "tensorrt": str(trt.__version__),
            "gpu": gpu.name,
            "compute_capability": gpu.cc,
            "cuda_python": versions("cuda-python")["cuda-python"],
        }
    return _TARGETS[device]


class BuildStage:
    """typed ONNX variant -> TensorRT plan per tower (`clipdeploy build`), on this GPU."""

    name = "build"

    def inputs(self, unit: Unit, ctx: Context) -> dict[str, Any]:
        cfg = ctx.plan.build[unit.precision]
        source = "export" if unit.precision == REFERENCE else f"quantize:{unit.precision}"
        return {
            "source": ctx.keys[source],
            # The timing cache only speeds the build up; the device is replaced by the GPU's identity.
            **config_values(cfg, exclude=("artifact", "validate", "device", "timing_cache")),
            "target": tensorrt_target(cfg.device),
            "tools": _tools(),
        }

    def run(self, unit: Unit, ctx: Context) -> Result:
        entries = build_engines(ctx.plan.build[unit.precision])
        view = ArtifactView.read(ctx.plan.artifact)
        rels = [_artifact_rel(e["file"]) for e in entries]
        target = tensorrt_target(ctx.plan.build[unit.precision].device)
        figures = {
            "engines": len(entries),
            "megabytes": round(sum(e["bytes"] for e in entries) / 1e6, 1),
            "seconds": round(sum(e["build_seconds"] for e in entries), 1),
            "gpu": target["gpu"],
            "tensorrt": target["tensorrt"],
        }
        return Result(describe_files(ctx.plan.root, rels, view), figures)

    def current(self, unit: Unit, ctx: Context, record: dict[str, Any]) -> bool:
        return bool(record.get("outputs")) and outputs_intact(ctx.plan, record["outputs"])

    @staticmethod
    def describe(figures: dict[str, Any]) -> str:
        if "engines" not in figures:
            return ""
        f = figures
        return f"{f['engines']} engines, {f['megabytes']} MB on {f['gpu']}, TensorRT {f['tensorrt']}"


class ValidateStage:
    """each engine vs its ONNX source on this GPU (`clipdeploy validate`)."""

    name = "validate"

    def _engines(self, unit: Unit, ctx: Context) -> list[str]:
        record = ctx.state.get(f"build:{unit.precision}") or {}
        return sorted(rel[len(ARTIFACT_DIR) + 1 :] for rel in record.get("outputs") or {})

    def inputs(self, unit: Unit, ctx: Context) -> dict[str, Any]:
        cfg = ctx.plan.build[unit.precision]
        return {
            "build": ctx.keys[f"build:{unit.precision}"],
            "tolerance": dataclasses.asdict(TOLERANCES[unit.precision or REFERENCE]),
            "target": tensorrt_target(cfg.device),
            "tools": _tools("onnxruntime"),
        }

    def run(self, unit: Unit, ctx: Context) -> Result:
        cfg = ctx.plan.build[unit.precision]
        files = self._engines(unit, ctx)
        report = validate_engines(
            str(ctx.plan.artifact), device=cfg.device, files=files, engine_host_code_allowed=cfg.version_compat
        )
        view = ArtifactView.read(ctx.plan.artifact)
        figures = {
            f: {k: r[k] for k in ("min_cosine", "max_abs_err", "passed") if k in r} if "skipped" not in r else r
            for f, r in report.items()
        }
        return Result(describe_files(ctx.plan.root, [_artifact_rel(f) for f in files], view), {"engines": figures})

    def current(self, unit: Unit, ctx: Context, record: dict[str, Any]) -> bool:
        if not record.get("outputs") or not outputs_intact(ctx.plan, record["outputs"]):
            return False
        accepted = {v.file for v in ArtifactView.read(ctx.plan.artifact).variants if v.accepted}
        return all(rel[len(ARTIFACT_DIR) + 1 :] in accepted for rel in record["outputs"])

    @staticmethod
    def describe(figures: dict[str, Any]) -> str:
        engines = figures.get("engines") or {}
        parts = [
            f"{Path(f).name.split('.')[0]} min cos {r['min_cosine']:.6f}"
            for f, r in engines.items()
            if "min_cosine" in r
        ]
        return ", ".join(parts)


# ---- bench -----------------------------------------------------------------------------------------


def _machine(device: str) -> dict[str, Any]:
    resolved = resolve_device(device)
    env = environment.collect(1, resolved)
    if resolved == "cuda" and not env.get("gpus"):
        raise Unavailable("bench.device is cuda, and nvidia-smi sees no NVIDIA GPU here; set bench.device: auto or cpu")
    return {
        "cpu": env.get("cpu"),
        "cores": env.get("available_cores"),
        "device": resolved,
        "gpus": [g.get("name") for g in env.get("gpus") or []],
    }


def bench_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The fastest contender per tower at batch 8 (or the largest batch measured), with its speed-up over PyTorch."""
    records = [r for r in report.get("records") or [] if r.get("role") != "reference"]
    batches = sorted({r["batch"] for r in records})
    if not batches:
        return {"records": 0}
    batch = 8 if 8 in batches else batches[-1]
    best: dict[str, Any] = {}
    for r in records:
        if r["batch"] != batch:
            continue
        key = r.get("speedup_vs_torch_fp32") or 0.0
        held = best.get(r["tower"])
        if held is None or (key, -r["p50_ms"]) > (held["speedup"] or 0.0, -held["p50_ms"]):
            best[r["tower"]] = {
                "backend": r["backend"],
                "precision": r["precision"],
                "seq_len": r.get("seq_len"),
                "p50_ms": r["p50_ms"],
                "speedup": r.get("speedup_vs_torch_fp32"),
            }
    return {"batch": batch, "best": best, "records": len(records), "skipped": len(report.get("skipped") or [])}


class BenchStage:
    """latency of every variant against PyTorch (`clipdeploy bench`)."""

    name = "bench"

    def inputs(self, unit: Unit, ctx: Context) -> dict[str, Any]:
        cfg = ctx.plan.bench
        measured = sorted((v.file, v.sha256, v.accepted) for v in ArtifactView.read(ctx.plan.artifact).variants)
        return {
            "variants": measured,
            **config_values(cfg, exclude=("artifact", "output", "progress")),
            "machine": _machine(cfg.device),
            "tools": _tools("onnxruntime", "torch", "open_clip_torch", "tensorrt", "numpy"),
        }

    def run(self, unit: Unit, ctx: Context) -> Result:
        report = run_bench(ctx.plan.bench)
        out = Path(ctx.plan.bench.output)
        rels = [str((out / "bench.json").relative_to(ctx.plan.root))]
        return Result(describe_files(ctx.plan.root, rels), bench_figures(report))

    def current(self, unit: Unit, ctx: Context, record: dict[str, Any]) -> bool:
        return bool(record.get("outputs")) and outputs_intact(ctx.plan, record["outputs"])

    @staticmethod
    def describe(figures: dict[str, Any]) -> str:
        best = figures.get("best") or {}
        parts = []
        for tower, b in best.items():
            speed = f" {b['speedup']:.1f}x vs PyTorch" if b.get("speedup") else ""
            length = f" L{b['seq_len']}" if b.get("seq_len") else ""
            parts.append(f"{tower} {b['backend']} {b['precision']}{length} {b['p50_ms']:.1f} ms{speed}")
        return (f"b{figures['batch']}: " + "; ".join(parts)) if parts else ""


STAGES: dict[str, Any] = {
    "export": ExportStage(),
    "quantize": QuantizeStage(),
    "build": BuildStage(),
    "validate": ValidateStage(),
    "bench": BenchStage(),
}
