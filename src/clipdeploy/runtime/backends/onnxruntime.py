"""ONNX Runtime backend: its runner and its registration. ``onnxruntime`` is imported only when a runner is made
(or, once it is known installed, when CUDA availability is asked)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy import cpu_features, precisions
from clipdeploy.errors import ArtifactError, DependencyError, UsageError, unreadable
from clipdeploy.artifact.external_data import check_locations
from clipdeploy.artifact.manifest import Variant
from clipdeploy.artifact.view import ArtifactView
from clipdeploy.runtime.backends import registry
from clipdeploy.runtime.backends.base import IOSpec, Runner
from clipdeploy.runtime.backends.registry import BackendSpec, BenchSettings, LoadSettings

_ORT_DTYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
}
_OPT_LEVELS = ("disable", "basic", "extended", "all")
# Variants whose files hold int8 Q/DQ: their runners' describe() says which int8 kernels run them.
INT8_QDQ = (precisions.INT8, precisions.INT8_FP16)
X64_QUANT_PRECISION = "session.x64quantprecision"  # ONNX Runtime's session config key for the exact U8U8 path


def exact_int8_needed() -> bool:
    """Whether sessions here set ``session.x64quantprecision=1``: on CPUs without VNNI (AVX512-VNNI, AVX-VNNI,
    AMX-INT8) only, where ONNX Runtime's default int8 kernels saturate (see OrtRunner)."""
    return not cpu_features.has_vnni()


@dataclass(frozen=True)
class OrtOptions:
    """ONNX Runtime session settings. CLI, YAML and API all resolve through this."""

    # In order of preference; a (name, options dict) pair passes provider options, e.g. a CUDA device_id.
    providers: tuple[str | tuple[str, dict], ...] = ("CPUExecutionProvider",)
    intra_op_num_threads: int | None = None  # threads inside one op; None lets ONNX Runtime choose
    inter_op_num_threads: int | None = None  # threads across independent ops
    graph_optimization_level: str = "all"  # one of disable, basic, extended, all

    def __post_init__(self) -> None:
        if self.graph_optimization_level not in _OPT_LEVELS:
            raise UsageError(
                f"graph_optimization_level {self.graph_optimization_level!r} is not one of {', '.join(_OPT_LEVELS)}"
            )
        for name in ("intra_op_num_threads", "inter_op_num_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise UsageError(f"{name}={value!r} must be a non-negative integer (0 lets ONNX Runtime choose)")
        if not self.providers:
            raise UsageError("providers is empty; pass at least one, e.g. CPUExecutionProvider")


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise DependencyError(
            "the onnxruntime backend needs ONNX Runtime; install one of: pip install 'clipdeploy[cpu]' "
            "(CPU) or pip install 'clipdeploy[gpu]' (CUDA), never both"
        ) from e
    return onnxruntime


def graph_optimization_level(ort: Any, name: str) -> Any:
    """ONNX Runtime's GraphOptimizationLevel for one of our level names (disable, basic, extended, all)."""
    return {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[name]


class OrtRunner(Runner):
    """One ONNX file in one InferenceSession. ``InferenceSession.run`` is thread-safe."""

    def __init__(self, path: Path, options: OrtOptions, *, int8: bool = False) -> None:
        """``int8``: the file holds int8 Q/DQ, so ``describe()`` says which int8 kernels run it."""
        ort = import_onnxruntime()
        available = ort.get_available_providers()
        names = [p if isinstance(p, str) else p[0] for p in options.providers]
        missing = [p for p in names if p not in available]
        if missing:
            raise DependencyError(
                f"ONNX Runtime provider(s) {', '.join(missing)} are not available (this install has "
                f"{', '.join(available)}); install onnxruntime-gpu for CUDA, or ask for CPUExecutionProvider"
            )
        so = ort.SessionOptions()
        # x86 CPUs without VNNI run int8 MatMul/Conv as U8S8 with VPMADDUBSW, whose 16-bit pair sums
        # saturate: measured (2-core AVX2 EPYC) it took micro ResNet's int8 text mean cosine from 0.999 to
        # 0.987. ONNX Runtime's exact U8U8 path fixes that, and is set only there: with VNNI the default
        # kernels do not saturate (bit-identical int8 outputs measured), and the U8U8 path is much slower
        # (ViT-B-32 int8 image tower, 1.5x on an AVX512-VNNI EPYC: docs/measured.md). Gates and serving both
        # run through this class: what was gated is what runs.
        self.exact_int8 = exact_int8_needed()
        if self.exact_int8:
            so.add_session_config_entry(X64_QUANT_PRECISION, "1")
        if options.intra_op_num_threads is not None:
            so.intra_op_num_threads = options.intra_op_num_threads
        if options.inter_op_num_threads is not None:
            so.inter_op_num_threads = options.inter_op_num_threads
        so.graph_optimization_level = graph_optimization_level(ort, options.graph_optimization_level)
        self.path = Path(path)
        self.options = options
        self.int8 = int8

        check_locations(self.path)  # older ONNX Runtime releases follow external data out of the model's folder
        try:
            open(path, "rb").close()  # an unreadable file is named as such, not called corrupt
        except PermissionError as e:
            raise unreadable(path, e) from None
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=list(options.providers))
        except Exception as e:  # onnxruntime raises its own pybind error types
            raise ArtifactError(
                f"ONNX Runtime cannot load {str(path)!r} ({' '.join(str(e).split())[:200]}); "
                "the file is corrupt or from a newer exporter: re-export the model with --force"
            ) from e
        # ONNX Runtime drops to CPU when a provider fails to initialise; we refuse to do that silently.
        active = self.session.get_providers()
        if active[0] != names[0]:
            raise DependencyError(
                f"ONNX Runtime could not start {names[0]} (active: {', '.join(active)}); "
                "check the CUDA install, or ask for CPUExecutionProvider explicitly"
            )
        self.inputs = [self._io(i) for i in self.session.get_inputs()]
        self.outputs = [self._io(o) for o in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    @staticmethod
    def _io(arg: Any) -> IOSpec:
        dtype = _ORT_DTYPES.get(arg.type)
        if dtype is None:
            raise UsageError(f"ONNX tensor {arg.name!r} has type {arg.type}, which clipdeploy does not feed")
        shape = tuple(d if isinstance(d, int) else str(d) for d in arg.shape)
        return IOSpec(arg.name, dtype, shape)

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def describe(self) -> str:
        first = self.providers[0]
        if not self.int8 or first != "CPUExecutionProvider":
            return f"onnxruntime ({first})"
        how = f"exact U8U8 int8 ({X64_QUANT_PRECISION}=1: no VNNI)" if self.exact_int8 else "VNNI int8 kernels"
        return f"onnxruntime ({first}, {how})"

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.session.run(self._output_names, feed)
        return dict(zip(self._output_names, results, strict=True))


# ---- registration -------------------------------------------------------------------------------------

NAME = "onnxruntime"


def options_from(settings: LoadSettings) -> OrtOptions:
    """The session options ``load()``'s settings ask for (a bad value is refused here, before any file opens)."""
    return OrtOptions(
        providers=tuple(settings.providers or ("CPUExecutionProvider",)),
        intra_op_num_threads=settings.intra_op_num_threads,
        inter_op_num_threads=settings.inter_op_num_threads,
        graph_optimization_level=settings.graph_optimization_level,
    )


def _bench_target(device: str) -> str:
    return f"{NAME}-{device}"


def _target(settings: LoadSettings) -> str:
    return _bench_target("cpu" if registry.first_provider(settings) == "CPUExecutionProvider" else "cuda")


def _open(view: ArtifactView, precision: str | None, settings: LoadSettings, verify: bool) -> registry.Opened:
    options = options_from(settings)
    preference = registry.get(NAME).preference(settings)

    def make(path: Path, v: Variant) -> Runner:
        return OrtRunner(path, options, int8=v.precision in INT8_QDQ)

    return registry.open_onnx_files(view, precision, preference, verify, make)


def _open_file(path: Path, precision: str, settings: LoadSettings) -> Runner:
    """One ONNX file as a ``precision`` variant (quantize's gate)."""
    return OrtRunner(path, options_from(settings), int8=precision in INT8_QDQ)


def available_providers() -> list[str]:
    """ONNX Runtime's execution providers in this install."""
    import onnxruntime  # only a CUDA check pays for the import, and only once ONNX Runtime is known installed

    return list(onnxruntime.get_available_providers())


def _unavailable(device: str) -> str | None:
    if not registry.has_module("onnxruntime"):
        return "ONNX Runtime is not installed; pip install 'clipdeploy[cpu]' or 'clipdeploy[gpu]'"
    if device == "cuda" and "CUDAExecutionProvider" not in available_providers():
        return "this ONNX Runtime has no CUDAExecutionProvider; pip install 'clipdeploy[gpu]' (instead of [cpu])"
    return None


def _bench_settings(bench: BenchSettings) -> Mapping[str, Any]:
    # The benchmark gives every contender the same intra-op threads, and runs the device it measures.
    return {
        "intra_op_num_threads": bench.threads,
        "inter_op_num_threads": 1,
        "graph_optimization_level": bench.graph_optimization_level,
        "providers": ["CUDAExecutionProvider"] if bench.device == "cuda" else ["CPUExecutionProvider"],
    }


# auto tries it last: it always opens (TensorRT and OpenVINO rank before it where they fit).
SPEC = registry.register(BackendSpec(
    NAME, "onnx", ("cpu", "cuda"), _open, _unavailable,
    target=_target, auto=lambda view, precision, settings: None, auto_rank=100,
    bench_target=_bench_target, bench_settings=_bench_settings, check=options_from, open_file=_open_file,
))
