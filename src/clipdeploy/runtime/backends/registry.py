"""The backend registry: every runtime backend, how to tell it is available, and how to open its runners.

``load(backend=...)`` validates against it and resolves ``"auto"`` through it, the CLI's ``--backend``
choices and the benchmark's contenders come from it. Adding a backend is one ``register(BackendSpec(...))``
call plus its runner module; which precisions it runs is each ``PrecisionSpec.backends``.

Light: availability checks use ``importlib.util.find_spec``; a backend's module is imported only
when its runners are opened.
"""

from __future__ import annotations

import difflib
import importlib.util
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from clipdeploy import cpu_features, precisions
from clipdeploy.errors import ArtifactError, UsageError
from clipdeploy.artifact.manifest import Variant, variant_files, variants, verify_files
from clipdeploy.artifact.external_data import check_variant_external_data
from clipdeploy.runtime.backends.base import Runner

__all__ = [
    "BackendSpec", "LoadSettings", "register", "unregister", "get", "names", "choices", "has_module",
    "select_variant", "AUTO", "auto_order", "check_settings", "open_file",
]

AUTO = "auto"


@dataclass(frozen=True)
class LoadSettings:
    """The backend settings ``load()`` takes; each backend reads those it understands."""

    providers: tuple[Any, ...] = ("CPUExecutionProvider",)  # ONNX Runtime
    intra_op_num_threads: int | None = None
    inter_op_num_threads: int | None = None
    graph_optimization_level: str = "all"
    device: int = 0  # TensorRT
    cuda_graphs: bool = False
    engine_host_code_allowed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # for registered backends


Opened = tuple[dict[str, Variant], dict[str, Runner]]


@dataclass(frozen=True)
class BackendSpec:
    """One runtime backend."""

    name: str
    format: str  # the manifest variant format it runs ("onnx", "tensorrt")
    devices: tuple[str, ...]  # device kinds it can run on: "cpu", "cuda"
    # Runners for every tower: (root, manifest, precision or None, settings, verify) -> (variants, runners).
    open: Callable[[Path, dict[str, Any], str | None, LoadSettings, bool], Opened]
    # Why it cannot run on device kind ("cpu"/"cuda") here, cheaply (no heavy import); None when it can.
    unavailable: Callable[[str], str | None]
    # The precision-preference target for these settings (see PrecisionSpec.preference).
    target: Callable[[LoadSettings], str]
    # For backend="auto": why this artifact should not use it here (None: use it). None: never chosen by auto.
    auto: Callable[[dict[str, Any], str | None, LoadSettings], str | None] | None = None
    auto_rank: int = 50  # auto tries backends lowest rank first (ties: registration order)
    bench_target: Callable[[str], str] | None = None  # device kind -> target, for benchmark defaults
    # Registered precisions it runs, declared here rather than in each PrecisionSpec: name -> preference
    # rank on its ``targets`` (None: only when asked for). See precisions.allow.
    runs: Mapping[str, int | None] = field(default_factory=dict)
    targets: tuple[str, ...] = ()  # the preference targets ``target`` returns
    # Refuses settings it would refuse when opened (a bad value), cheaply: load() asks every backend before
    # choosing one, so a bad option is refused whichever backend runs, not only when its backend does.
    check: Callable[[LoadSettings], object] | None = None
    options: tuple[str, ...] = ()  # the LoadSettings.extra keys (load's backend_options) it reads
    # One ONNX file run as a variant of a precision, for a one-off check such as quantize's gate (no
    # compiled-model cache): (path, precision, settings) -> runner. None: it cannot run a lone ONNX file.
    open_file: Callable[[Path, str, LoadSettings], Runner] | None = None

    def precisions(self) -> tuple[str, ...]:
        return precisions.for_backend(self.name)

    def preference(self, settings: LoadSettings) -> tuple[str, ...]:
        return tuple(p for p in precisions.preference(self.target(settings)) if p in self.precisions())


_REGISTRY: dict[str, BackendSpec] = {}


def register(spec: BackendSpec, *, replace: bool = False) -> BackendSpec:
    """Add a backend; registration order is the order of ``--backend`` choices."""
    if spec.name in _REGISTRY and not replace:
        raise UsageError(f"backend {spec.name!r} is already registered; pass replace=True to redefine it")
    if spec.name == AUTO:
        raise UsageError(f"{AUTO!r} is reserved: it means 'pick a backend'; name the backend something else")
    _REGISTRY[spec.name] = spec
    if spec.runs:
        precisions.allow(spec.name, spec.runs, spec.targets)
    return spec


def unregister(name: str) -> None:
    """Remove a backend; no precision lists it afterwards."""
    spec = _REGISTRY.pop(name, None)
    if spec is not None:
        precisions.disallow(name, spec.targets)


def get(name: str) -> BackendSpec:
    if name not in _REGISTRY:
        raise UsageError(f"backend {name!r} is not one of {', '.join(choices())}")
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    """Registered backends, in registration order."""
    return tuple(_REGISTRY)


def auto_order() -> tuple[str, ...]:
    """The order ``backend="auto"`` tries them: by ``auto_rank``, then registration order."""
    return tuple(sorted(_REGISTRY, key=lambda n: _REGISTRY[n].auto_rank))


def choices() -> tuple[str, ...]:
    """What ``load(backend=...)`` and ``--backend`` accept."""
    return (AUTO, *_REGISTRY)


def check_settings(settings: LoadSettings) -> None:
    """Refuse a setting no backend takes: a bad value for any backend, or a backend_options key none reads."""
    for spec in _REGISTRY.values():
        if spec.check is not None:
            spec.check(settings)
    known = sorted({key for spec in _REGISTRY.values() for key in spec.options})
    for key in settings.extra:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known) or 'none'}"
            raise UsageError(f"backend_options key {key!r} is not read by any backend ({hint})")


def open_file(backend: str, path: Path, precision: str, settings: LoadSettings) -> Runner:
    """A runner on the ONNX file ``path``, run by ``backend`` as it runs ``precision`` variants (the
    precision's backend settings included), uncached: what quantize's gate judges is what serving runs."""
    spec = get(backend)
    if spec.open_file is None:
        raise UsageError(f"backend {backend!r} cannot run a lone ONNX file; gate on one of "
                         f"{', '.join(n for n, s in _REGISTRY.items() if s.open_file is not None)}")
    return spec.open_file(path, precision, settings)


def has_module(name: str) -> bool:
    """Whether ``name`` is importable, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def select_variant(
    manifest: dict[str, Any], tower: str, fmt: str, precision: str | None, preference: Sequence[str]
) -> Variant:
    """The ``fmt`` variant of ``tower`` to run: ``precision`` when named, else the first accepted in ``preference``."""
    candidates = [v for v in variants(manifest) if v.tower == tower and v.format == fmt]
    if precision is not None:
        precisions.get(precision)  # an unknown name: one line with a suggestion
        for v in candidates:
            if v.precision == precision:
                if not v.accepted:
                    raise ArtifactError(
                        f"the {precision} {tower} variant did not pass its accuracy gate; "
                        "re-run `clipdeploy quantize` or choose another precision"
                    )
                lacking = cpu_features.missing(v.extra.get("requires_cpu") or ())
                if lacking is not None:
                    raise UsageError(
                        f"the {precision} {tower} variant needs a CPU with {lacking}, which this one lacks; "
                        "choose another precision"
                    )
                return v
        have = sorted({v.precision for v in candidates}) or ["none"]
        raise ArtifactError(
            f"no {precision} {fmt} variant of the {tower} tower (have: {', '.join(have)}); "
            f"make one with `clipdeploy quantize --precision {precision}`"
        )
    for want in preference:
        for v in candidates:
            # A variant made on another machine may need a CPU feature this one lacks: pass over it.
            if v.precision == want and v.accepted and cpu_features.missing(v.extra.get("requires_cpu") or ()) is None:
                return v
    raise ArtifactError(
        f"no accepted {fmt} variant of the {tower} tower; re-export the model with `clipdeploy export --force`"
    )


def open_onnx_files(
    root: Path,
    manifest: dict[str, Any],
    precision: str | None,
    preference: Sequence[str],
    verify: bool,
    make_runner: Callable[[Path], Runner] | None,
    *,
    variant_runner: Callable[[Path, Variant], Runner] | None = None,
) -> Opened:
    """Pick, check and open each tower's ONNX variant; for any backend that runs ONNX files.

    ``variant_runner``, when given, replaces ``make_runner`` for backends whose runner depends on the
    variant's precision, not only its file (two variants may share one file, e.g. fp32 and bf16)."""
    chosen: dict[str, Variant] = {}
    runners: dict[str, Runner] = {}
    for tower in manifest["towers"]:
        variant = select_variant(manifest, tower, "onnx", precision, preference)
        if verify:
            verify_files(root, variant_files(variant))
        check_variant_external_data(root, variant.file, variant.external_data)
        path = root / variant.file
        if variant_runner is not None:
            runners[tower] = variant_runner(path, variant)
        else:
            assert make_runner is not None, "open_onnx_files needs make_runner or variant_runner"
            runners[tower] = make_runner(path)
        chosen[tower] = variant
    return chosen, runners


# ---- ONNX Runtime -------------------------------------------------------------------------------------
# Each backend's module is imported inside its functions, on first use: the registry stays a table that
# costs nothing to import, and one backend's module (TensorRT's is 600 lines) never loads for another's.


def _ort_options(settings: LoadSettings) -> Any:
    # here, not at the top: a backend's module loads only when that backend is used
    from clipdeploy.runtime.backends.onnxruntime import OrtOptions

    return OrtOptions(
        providers=tuple(settings.providers or ("CPUExecutionProvider",)),
        intra_op_num_threads=settings.intra_op_num_threads,
        inter_op_num_threads=settings.inter_op_num_threads,
        graph_optimization_level=settings.graph_optimization_level,
    )


def _ort_target(settings: LoadSettings) -> str:
    providers = settings.providers or ("CPUExecutionProvider",)
    first = providers[0] if isinstance(providers[0], str) else providers[0][0]
    return _ort_bench_target("cpu" if first == "CPUExecutionProvider" else "cuda")


def _ort_bench_target(device: str) -> str:
    return f"onnxruntime-{device}"


def _ort_open(
    root: Path, manifest: dict[str, Any], precision: str | None, settings: LoadSettings, verify: bool
) -> Opened:
    # here, not at the top: a backend's module loads only when that backend is used
    from clipdeploy.runtime.backends.onnxruntime import INT8_QDQ, OrtRunner

    options = _ort_options(settings)
    preference = get("onnxruntime").preference(settings)

    def make(path: Path, v: Variant) -> Runner:
        return OrtRunner(path, options, int8=v.precision in INT8_QDQ)

    return open_onnx_files(root, manifest, precision, preference, verify, None, variant_runner=make)



def _ort_file(path: Path, precision: str, settings: LoadSettings) -> Runner:
    # here, not at the top: a backend's module loads only when that backend is used
    from clipdeploy.runtime.backends.onnxruntime import INT8_QDQ, OrtRunner

    return OrtRunner(path, _ort_options(settings), int8=precision in INT8_QDQ)


def _ort_providers() -> list[str]:
    import onnxruntime  # only a CUDA check pays for the import, and only once ONNX Runtime is known installed

    return list(onnxruntime.get_available_providers())


def _ort_unavailable(device: str) -> str | None:
    if not has_module("onnxruntime"):
        return "ONNX Runtime is not installed; pip install 'clipdeploy[cpu]' or 'clipdeploy[gpu]'"
    if device == "cuda" and "CUDAExecutionProvider" not in _ort_providers():
        return "this ONNX Runtime has no CUDAExecutionProvider; pip install 'clipdeploy[gpu]' (instead of [cpu])"
    return None


# ---- TensorRT -----------------------------------------------------------------------------------------


def _trt_options(settings: LoadSettings) -> Any:
    # here, not at the top: a backend's module loads only when that backend is used
    from clipdeploy.runtime.backends.tensorrt import TrtOptions

    return TrtOptions(
        device=settings.device,
        cuda_graphs=settings.cuda_graphs,
        engine_host_code_allowed=settings.engine_host_code_allowed,
    )


def _trt_open(
    root: Path, manifest: dict[str, Any], precision: str | None, settings: LoadSettings, verify: bool
) -> Opened:
    # here, not at the top: a backend's module loads only when that backend is used
    from clipdeploy.runtime.backends import tensorrt

    preference = get("tensorrt").preference(settings)
    return tensorrt.load_runners(root, manifest, precision, _trt_options(settings), preference, verify=verify)


def _trt_auto(manifest: dict[str, Any], precision: str | None, settings: LoadSettings) -> str | None:
    # here, not at the top: a backend's module loads only when that backend is used
    from clipdeploy.runtime.backends import tensorrt

    preference = get("tensorrt").preference(settings)
    return tensorrt.unavailable_reason(manifest, precision, _trt_options(settings), preference)


def _trt_unavailable(device: str) -> str | None:
    if device != "cuda":
        return "needs an NVIDIA GPU, and none was found (nvidia-smi); run the benchmark on a GPU machine"
    if not has_module("tensorrt"):
        return "TensorRT is not installed; pip install 'clipdeploy[tensorrt]'"
    return None


# ---- OpenVINO -----------------------------------------------------------------------------------------

_X86 = ("x86_64", "amd64", "i386", "i686")


_OV_OPTIONS = ("openvino_cache_dir", "openvino_performance_hint", "openvino_int8_without_vnni")


def _ov_options(settings: LoadSettings) -> Any:
    # here, not at the top: a backend's module loads only when that backend is used
    from clipdeploy.runtime.backends.openvino import OvOptions

    return OvOptions(
        num_threads=settings.intra_op_num_threads,
        cache_dir=settings.extra.get("openvino_cache_dir"),
        performance_hint=settings.extra.get("openvino_performance_hint", "LATENCY"),
    )


def _ov_open(
    root: Path, manifest: dict[str, Any], precision: str | None, settings: LoadSettings, verify: bool
) -> Opened:
    # here, not at the top: a backend's module loads only when that backend is used
    from clipdeploy.runtime.backends.openvino import OvRunner

    options = _ov_options(settings)
    int8_anyway = bool(settings.extra.get("openvino_int8_without_vnni"))
    preference = get("openvino").preference(settings)
    if not cpu_features.has_vnni() and not int8_anyway:
        if precision == precisions.INT8:
            raise UsageError(_OV_INT8_REFUSAL)
        preference = tuple(p for p in preference if p != precisions.INT8)

    def make(path: Path, v: Variant) -> Runner:
        return OvRunner(path, v.precision, v.sha256, options)

    return open_onnx_files(root, manifest, precision, preference, verify, None, variant_runner=make)


# What is served must be what was gated: the int8 gate runs on ONNX Runtime, and OpenVINO's int8 kernels
# without VNNI measured cosine 0.969 against PyTorch on ViT-B-32 (2-core AVX2 EPYC) where ONNX Runtime's
# gated U8U8 path measured 0.9997. With VNNI, OpenVINO int8 measured 0.9993 (issue 14), so it runs there.
_OV_INT8_REFUSAL = (
    "OpenVINO's int8 on a CPU without VNNI (AVX512-VNNI, AVX-VNNI or AMX) is less accurate than the gated "
    "int8 (cosine 0.969 vs 0.9997 measured on ViT-B-32); use backend='onnxruntime', or pass "
    "backend_options={'openvino_int8_without_vnni': True} to run it ungated"
)


def _ov_file(path: Path, precision: str, settings: LoadSettings) -> Runner:
    # here, not at the top: a backend's module loads only when that backend is used
    from clipdeploy.runtime.backends.openvino import OvRunner

    return OvRunner(path, precision, "", replace(_ov_options(settings), cache_dir=""))  # uncached: no sum needed


def _ov_unavailable(device: str) -> str | None:
    if device != "cpu":
        return "runs on CPU only; use onnxruntime or tensorrt on a GPU"
    if not has_module("openvino"):
        return "OpenVINO is not installed; pip install 'clipdeploy[openvino]'"
    return None


def _ov_auto(manifest: dict[str, Any], precision: str | None, settings: LoadSettings) -> str | None:
    first = settings.providers[0] if settings.providers else "CPUExecutionProvider"
    if (first if isinstance(first, str) else first[0]) != "CPUExecutionProvider":
        return "ONNX Runtime providers other than CPU were asked for"
    reason = get("openvino").unavailable("cpu")
    if reason is not None:
        return reason
    if platform.machine().lower() not in _X86:
        return f"ranked first only on x86 CPUs (this is {platform.machine()})"
    if not cpu_features.has_vnni():
        # Measured on a 2-core AVX2 EPYC (ViT-B-32 image tower, batch 8): OpenVINO's int8 reached cosine
        # 0.969 against PyTorch and was 1.5x slower than ONNX Runtime's exact U8U8 int8 (0.9997), and
        # the gate runs on ONNX Runtime; so without VNNI, auto keeps ONNX Runtime.
        return "ranked first only on CPUs with VNNI (int8 on OpenVINO without it lost accuracy when measured)"
    runs = get("openvino").precisions()
    if precision is not None and precision not in runs:
        return f"does not run {precision}"
    for tower in manifest["towers"]:
        want = [precision] if precision is not None else list(get("openvino").preference(settings))
        if not any(v.tower == tower and v.format == "onnx" and v.accepted and v.precision in want
                   for v in variants(manifest)):
            return f"no accepted {'/'.join(want)} variant of the {tower} tower"
    return None


# auto tries TensorRT first (when the artifact has engines that fit here), then ONNX Runtime, which always opens.
register(BackendSpec(
    "onnxruntime", "onnx", ("cpu", "cuda"), _ort_open, _ort_unavailable,
    target=_ort_target, auto=lambda manifest, precision, settings: None, auto_rank=100,
    bench_target=_ort_bench_target, check=_ort_options, open_file=_ort_file,
))
register(BackendSpec(
    "tensorrt", "tensorrt", ("cuda",), _trt_open, _trt_unavailable,
    target=lambda settings: "tensorrt", auto=_trt_auto, auto_rank=0, bench_target=lambda device: "tensorrt",
    check=_trt_options,
))
# OpenVINO ranks before ONNX Runtime on x86 CPUs with VNNI (see _ov_auto for why not without). Measured: ViT-B-32 fp32 image file, batch 8, 2 threads, a
# loaded 2-core AMD EPYC (AVX2): OpenVINO 1.05x ONNX Runtime (cosine 0.99999994); issue 14's AVX-512 machine:
# OpenVINO 1.45x ONNX Runtime on the int8 file. int8 first (with VNNI only: see _ov_open), then bf16 (on CPUs
# with native bf16, where OpenVINO's bf16 ran 1.7x its f32 in the design probes), then fp32.
register(BackendSpec(
    "openvino", "onnx", ("cpu",), _ov_open, _ov_unavailable,
    target=lambda settings: "openvino-cpu", auto=_ov_auto, auto_rank=50,
    bench_target=lambda device: "openvino-cpu",
    runs={"int8": 0, "bf16": 1, "fp32": 2}, targets=("openvino-cpu",),
    check=_ov_options, options=_OV_OPTIONS, open_file=_ov_file,
))
