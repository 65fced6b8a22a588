"""The build stage: typed ONNX variant -> TensorRT plan per tower, recorded in the manifest.

Precision lives in the ONNX graph, so every network is strongly typed and no precision flag is set:
the same code builds on TensorRT 10 and 11. Plans are named by tower, precision, GPU and TensorRT
version, so engines for several GPUs and versions live side by side in one artifact.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from clipdeploy import precisions, progress
from clipdeploy.engines.config import BuildConfig, Range
from clipdeploy.engines.validate import check_compute_capability, validate_engines
from clipdeploy.errors import ArtifactError, EngineError, UsageError
from clipdeploy.artifact.manifest import (
    PendingFile,
    Variant,
    atomic_write_bytes,
    file_sha256,
    updating_manifest,
    variant_files,
    verify_files,
)
from clipdeploy.artifact.external_data import check_variant_external_data
from clipdeploy.artifact.view import ArtifactView
from clipdeploy.runtime import cuda
from clipdeploy.runtime.tensorrt_compat import HARDWARE_COMPAT, base_version, get_logger, import_tensorrt
from clipdeploy.artifact.staging import clean_stale_writes

log = logging.getLogger(__name__)

ENGINE_DIR = "engines"
BATCH_AXIS = "batch"
SEQUENCE_AXIS = "sequence"


def plan_name(
    tower: str, precision: str, gpu: cuda.GpuInfo, version: str, hardware_compat: str, version_compat: bool
) -> str:
    """e.g. ``image.fp16.sm90.trt11.4.0.plan``; portable plans say so in the name."""
    target = "ampere-plus" if hardware_compat == "ampere-plus" else gpu.sm
    return f"{tower}.{precision}.{target}.trt{base_version(version)}{'-vc' if version_compat else ''}.plan"


# ---- inputs -------------------------------------------------------------------------------------


def sources(view: ArtifactView, cfg: BuildConfig) -> dict[str, Variant]:
    """The ONNX variant of ``cfg.precision`` for each tower to build."""
    towers = cfg.towers or tuple(view.towers)
    missing_towers = [t for t in towers if t not in view.towers]
    if missing_towers:
        raise UsageError(f"this artifact has no {', '.join(missing_towers)} tower; it has {', '.join(view.towers)}")
    if precisions.get(cfg.precision).runs_file_of is not None:  # its variant is another file under a runtime setting
        runs = " or ".join(precisions.get(cfg.precision).backends) or "no backend"
        raise UsageError(f"{cfg.precision} runs on {runs} only, not TensorRT; build --precision fp16 or int8-fp16")
    found: dict[str, Variant] = {}
    for tower in towers:
        onnx = view.variants_of(tower, "onnx")
        match = [v for v in onnx if v.precision == cfg.precision]
        if not match:
            have = ", ".join(sorted({v.precision for v in onnx})) or "none"
            raise ArtifactError(
                f"no {cfg.precision} ONNX variant of the {tower} tower to compile (have: {have}); "
                f"make one with `clipdeploy quantize {cfg.artifact} --precision {cfg.precision}`"
            )
        if not match[0].accepted:
            raise ArtifactError(
                f"the {cfg.precision} ONNX variant of the {tower} tower did not pass its accuracy gate; "
                "re-run `clipdeploy quantize` or choose another --precision"
            )
        found[tower] = match[0]
    return found


def axis_ranges(
    tower: str, inputs: list[tuple[str, tuple[int, ...]]], view: ArtifactView, cfg: BuildConfig
) -> dict[str, tuple[Range, tuple[str, ...]]]:
    """min/opt/max shapes for every network input with a dynamic axis, and the axis names.

    Axes are named by the manifest's tower inputs ("batch", "sequence", ...); the network's own
    shapes (-1 = dynamic) say which axes are dynamic, so a renamed input cannot lose its profile.
    A dynamic sequence axis defaults to 1:32:``view.context_length`` and may not exceed it.
    """
    declared = {t.name: t.shape for t in view.tower_inputs(tower)}
    context_length = view.context_length
    profile: dict[str, Any] = {}
    for name, dims in inputs:
        if all(d >= 0 for d in dims):
            continue
        names = list(declared.get(name, ()))
        lo, opt, hi = [], [], []
        axis_names = []
        for k, d in enumerate(dims):
            axis = (
                names[k] if k < len(names) and isinstance(names[k], str) else (BATCH_AXIS if k == 0 else f"{name}:{k}")
            )
            axis_names.append(axis)
            if d >= 0:
                r: Range = (d, d, d)
            elif axis == BATCH_AXIS:
                r = cfg.batch
            elif axis in cfg.shapes:
                r = cfg.shapes[axis]
            elif axis == SEQUENCE_AXIS and context_length is not None:
                r = (1, min(32, context_length), context_length)
            else:
                raise UsageError(
                    f"input {name!r} of the {tower} tower has a dynamic axis {axis!r} (dimension {k}) with no range; "
                    f"pass --shape {axis}=MIN:OPT:MAX"
                )
            if axis == SEQUENCE_AXIS and context_length is not None and r[2] > context_length:
                raise UsageError(
                    f"sequence range max {r[2]} exceeds the text tower's context length {context_length}; "
                    f"use at most {context_length}"
                )
            lo.append(r[0])
            opt.append(r[1])
            hi.append(r[2])
        profile[name] = ((tuple(lo), tuple(opt), tuple(hi)), tuple(axis_names))
    return profile


# ---- TensorRT -----------------------------------------------------------------------------------


def parser_failure(parser: Any, source: Path) -> str:
    """Every parser error: node name, operator and description."""
    errors = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node = e.node_name() or (f"#{e.node()}" if e.node() >= 0 else "")
        where = f"node {node} ({e.node_operator()})" if node else "the model"
        errors.append(f"{where}: {' '.join(e.desc().split())}")
    listed = "; ".join(errors) or "no error reported"
    return (
        f"TensorRT cannot parse {source.name}: {listed}. Re-export the model, or report the operator if this "
        "TensorRT version lacks it"
    )


class TimingCache:
    """A timing cache file shared by the builds of one run: loaded once, merged back into the file at the end."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.cache: Any = None
        self._config: Any = None

    def install(self, config: Any) -> None:
        if self.path is None:
            return
        self._config = config
        if self.cache is None:
            data = self.path.read_bytes() if self.path.is_file() else b""
            self.cache = config.create_timing_cache(data)
            if self.cache is None and data:
                log.warning("clipdeploy: timing cache %s is unreadable; starting a new one", self.path)
                self.cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(self.cache, False):
            # A cache made on another GPU or TensorRT version does not fit; keep going with a fresh one.
            log.warning("clipdeploy: timing cache %s does not fit this GPU/TensorRT; starting a new one", self.path)
            self.cache = config.create_timing_cache(b"")
            config.set_timing_cache(self.cache, False)

    def collect(self, config: Any) -> None:
        """Take the cache back from a finished build, whether TensorRT updated ours in place or a copy."""
        if self.path is not None:
            self.cache = config.get_timing_cache() or self.cache

    def save(self) -> None:
        if self.path is None or self.cache is None:
            return
        # Another build may have saved the file meanwhile: merge ours into what is there now.
        data = self.path.read_bytes() if self.path.is_file() else b""
        merged = self._config.create_timing_cache(data) if data else None
        if merged is not None and merged.combine(self.cache, False):
            atomic_write_bytes(self.path, merged.serialize())
        else:
            atomic_write_bytes(self.path, self.cache.serialize())


def _network_inputs(network: Any) -> list[tuple[str, tuple[int, ...]]]:
    return [(t.name, tuple(int(d) for d in t.shape)) for t in (network.get_input(i) for i in range(network.num_inputs))]


def build_plan(
    trt: Any, builder: Any, source: Path, tower: str, view: ArtifactView, cfg: BuildConfig, cache: TimingCache
) -> tuple[Any, dict[str, Any]]:
    """Parse ``source`` into a strongly typed network and build its plan; returns (plan, profile)."""
    logger = get_logger(trt)
    mark = logger.mark()
    # Strongly typed: the ONNX types decide the precision. TensorRT 11 is always so, 10 needs the flag.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        raise EngineError(parser_failure(parser, source))
    config = builder.create_builder_config()
    if cfg.workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace)
    config.builder_optimization_level = cfg.opt_level
    if not cfg.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if cfg.hardware_compat != "none":
        config.hardware_compatibility_level = getattr(
            trt.HardwareCompatibilityLevel, HARDWARE_COMPAT[cfg.hardware_compat]
        )
    if cfg.version_compat:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    ranges = axis_ranges(tower, _network_inputs(network), view, cfg)
    profile_record = {}
    if ranges:
        profile = builder.create_optimization_profile()
        for name, ((lo, opt, hi), _) in ranges.items():
            profile.set_shape(name, lo, opt, hi)
            profile_record[name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
        if config.add_optimization_profile(profile) < 0:
            raise EngineError(f"TensorRT rejected the profile {profile_record} for {source.name} ({logger.tail(mark)})")
    if cfg.opt_level == 0 and cfg.timing_cache is not None:
        log.warning("clipdeploy: --opt-level 0 ignores the timing cache")
    cache.install(config)
    plan = builder.build_serialized_network(network, config)
    del parser  # it owns the weights the network points at, so it lives until the build is done
    cache.collect(config)
    if plan is None:
        raise EngineError(
            f"TensorRT could not build the {tower} engine from {source.name}: {logger.tail(mark)}; "
            "check the GPU memory (--workspace) and the TensorRT log above (run with -v)"
        )
    return plan, profile_record


def _record(root: Path, plans: list[PendingFile], entries: list[dict[str, Any]]) -> None:
    """Rename the finished plans into place and add their entries, in one hold of the artifact's lock:
    a build beside this one never leaves an entry whose sum is of the other build's plan."""
    with updating_manifest(root) as manifest:  # read again: another stage may have written it meanwhile
        for plan in plans:
            plan.commit()
        new_files = {e["file"] for e in entries}
        # a writer under the artifact's lock: it edits the dict it writes back
        manifest["variants"] = [v for v in manifest["variants"] if v["file"] not in new_files] + entries


def build_engines(cfg: BuildConfig) -> list[dict[str, Any]]:
    """Compile each tower's ONNX variant of ``cfg.precision``; returns the new manifest entries.

    With ``cfg.validate`` each new engine is then compared with its ONNX source; a failure raises
    AccuracyError after the figures are recorded.
    """
    root = cfg.artifact
    view = ArtifactView.read(root)
    chosen = sources(view, cfg)
    for variant in chosen.values():
        verify_files(root, variant_files(variant))
        check_variant_external_data(root, variant.file, variant.external_data)  # TensorRT's parser reads them
    # A build killed while writing a plan leaves a plan-sized temporary: the next build removes it.
    for folder in (root, root / ENGINE_DIR):
        clean_stale_writes(folder)
    trt = import_tensorrt()
    version = str(trt.__version__)
    gpu = cuda.gpu_info(cfg.device)
    check_compute_capability(cfg.precision, gpu)
    cuda.set_device(cfg.device)
    logger = get_logger(trt)
    try:
        builder = trt.Builder(logger)
    except (TypeError, RuntimeError) as e:
        raise EngineError(
            f"TensorRT {version} could not start a builder ({e}; {logger.tail()}); check the GPU driver"
        ) from e
    cache = TimingCache(cfg.timing_cache)
    entries: list[dict[str, Any]] = []
    plans: list[PendingFile] = []  # each plan written in full beside its name, renamed with the manifest update
    try:
        for tower, variant in chosen.items():
            source = root / variant.file
            log.info("clipdeploy: building the %s %s engine from %s on %s", cfg.precision, tower, variant.file, gpu.name)
            start = time.perf_counter()
            with progress.stage(f"building the {cfg.precision} {tower} engine with TensorRT {version}"):
                plan, profile = build_plan(trt, builder, source, tower, view, cfg, cache)
            seconds = time.perf_counter() - start
            rel = f"{ENGINE_DIR}/{plan_name(tower, cfg.precision, gpu, version, cfg.hardware_compat, cfg.version_compat)}"
            plans.append(PendingFile(root / rel, plan))
            del plan
            tmp = plans[-1].tmp
            entries.append(
                {
                    "tower": tower,
                    "precision": cfg.precision,
                    "format": "tensorrt",
                    "file": rel,
                    "sha256": file_sha256(tmp),
                    "bytes": tmp.stat().st_size,
                    "source": variant.file,
                    "source_sha256": variant.sha256,
                    "tensorrt_version": version,
                    "gpu": gpu.name,
                    "compute_capability": gpu.cc,
                    "profile": profile,
                    "build_seconds": round(seconds, 2),
                    "hardware_compatibility": cfg.hardware_compat,
                    "version_compatible": cfg.version_compat,
                    "builder_optimization_level": cfg.opt_level,
                    "workspace_bytes": cfg.workspace,
                    "tf32": cfg.tf32,
                    "validation": {},
                }
            )
        cache.save()
        _record(root, plans, entries)
    finally:
        for plan in plans:
            plan.discard()  # those not committed (a failed build): no plan without its entry is left
    if cfg.validate:
        report = validate_engines(
            root, device=cfg.device, files=[e["file"] for e in entries], engine_host_code_allowed=cfg.version_compat
        )
        for e in entries:  # the record validate_engines wrote into each entry's validation (none when skipped)
            record = report.get(e["file"]) or {}
            if "skipped" not in record:
                e["validation"] = record
    return entries
