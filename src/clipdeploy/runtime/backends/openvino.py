"""OpenVINO backend (CPU): runs the artifact's own ONNX variants; its runner and its registration.
``openvino`` is imported only when a runner is made."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import stat
import tempfile
import threading
from dataclasses import dataclass, replace
from collections.abc import Iterator
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
from clipdeploy.runtime.backends.registry import BackendSpec, LoadSettings, Runs

log = logging.getLogger(__name__)

# What each variant precision promises is its PrecisionSpec.backend_settings["openvino"] (its
# INFERENCE_PRECISION_HINT, set explicitly: see precisions.py); a precision without one is not run here.


@dataclass(frozen=True)
class OvOptions:
    """OpenVINO settings. ``load()`` fills them from LoadSettings (threads) and LoadSettings.extra."""

    num_threads: int | None = None  # INFERENCE_NUM_THREADS; None lets OpenVINO choose (all cores)
    # Compiled-model cache; None: the per-user default (default_cache_dir(), else fallback_cache_dir()); "" disables it.
    cache_dir: str | None = None
    # LATENCY: one stream using every thread for each call. Reasoned, not yet measured against THROUGHPUT:
    # with several streams a single synchronous call runs on one stream's threads, and the session calls
    # synchronously, so LATENCY should win per call; THROUGHPUT is there for callers with many threads.
    performance_hint: str = "LATENCY"

    def __post_init__(self) -> None:
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads < 0):
            raise UsageError(f"intra_op_num_threads={self.num_threads!r} must be a non-negative integer (0: all)")
        if self.performance_hint not in ("LATENCY", "THROUGHPUT"):
            raise UsageError(f"openvino_performance_hint={self.performance_hint!r} must be LATENCY or THROUGHPUT")


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError as e:
        raise DependencyError("the openvino backend needs OpenVINO; pip install 'clipdeploy[openvino]'") from e
    return openvino


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/clipdeploy/openvino (~/.cache/... when unset): per user, never inside an artifact."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clipdeploy" / "openvino"


def fallback_cache_dir() -> Path | None:
    """A per-user cache under the temp folder, for when the default one cannot be written (a HOME that is
    another user's: containers, service accounts); None where it is not safely this user's own."""
    if not hasattr(os, "getuid"):
        return None
    own = Path(tempfile.gettempdir()) / f"clipdeploy-{os.getuid()}"
    try:
        own.mkdir(mode=0o700, exist_ok=True)
        st = own.lstat()
    except OSError:
        return None
    # Another user could have made it first, to plant compiled blobs: use it only if it is ours alone.
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return own / "openvino"


_REPORTED: set[str] = set()  # cache folders already reported as unusable: said once per process, not per load
_REPORTED_LOCK = threading.Lock()


def _report_once(level: int, base: Path, message: str, *args: object) -> None:
    with _REPORTED_LOCK:
        if str(base) in _REPORTED:
            return
        _REPORTED.add(str(base))
    log.log(level, message, *args)


def _make(folder: Path) -> OSError | None:
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        return e
    return None


def cache_folder(explicit: str | None, key: str) -> Path | None:
    """The compiled-model cache folder for ``key``: under ``explicit`` when given, else under the per-user
    default, falling back to a per-user temp folder, else None (compile uncached: a cache only saves time).

    An explicit folder that cannot be written is a warning (once per process); the default's fallback is
    quiet, said once at INFO (``--verbose``), since it is routine for a user whose HOME is not their own."""
    if explicit:
        error = _make(Path(explicit) / key)
        if error is None:
            return Path(explicit) / key
        _report_once(logging.WARNING, Path(explicit), "clipdeploy: OpenVINO cache %s is not writable (%s); "
                     "compiling without it", explicit, error)
        return None
    base = default_cache_dir()
    error = _make(base / key)
    if error is None:
        return base / key
    fallback = fallback_cache_dir()
    if fallback is not None and _make(fallback / key) is None:
        _report_once(logging.INFO, base, "clipdeploy: OpenVINO cache %s is not writable (%s); using %s",
                     base, error, fallback)
        return fallback / key
    _report_once(logging.INFO, base, "clipdeploy: OpenVINO cache %s is not writable (%s), nor a per-user one "
                 "under %s; compiling without a cache", base, error, tempfile.gettempdir())
    return None


@contextlib.contextmanager
def _cache_lock(folder: Path | None) -> Iterator[None]:
    """One compile at a time per cache folder, across processes: OpenVINO writes its cache blob without
    locking, and two processes compiling the same model at once (Ray Serve replicas, embed-dataset
    workers) were seen to fail with "filesystem error: cannot set permissions". The second one waits,
    then reads the first one's blob."""
    if folder is None:
        yield
        return
    try:
        fd = os.open(folder / ".compile.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:  # a cache we can read but not lock: compile as before
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def cache_key(sha256: str, ov_version: str, cpu: str, capabilities: list[str], config: dict[str, str]) -> str:
    """The cache folder name: file hash, OpenVINO version, CPU (name and capabilities) and settings."""
    blob = json.dumps([sha256, ov_version, cpu, sorted(capabilities), sorted(config.items())])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


_DTYPES = {"f32": np.float32, "f16": np.float16, "i64": np.int64, "i32": np.int32}


class OvRunner(Runner):
    """One ONNX file compiled once; each calling thread gets its own infer request."""

    def __init__(self, path: Path, precision: str, sha256: str, options: OvOptions) -> None:
        ov = import_openvino()
        settings = precisions.get(precision).backend_settings.get("openvino")
        if settings is None:
            runs = [n for n in precisions.names() if "openvino" in precisions.get(n).backend_settings]
            raise UsageError(f"the openvino backend does not run {precision} variants; choose {', '.join(runs)}")
        self.path = Path(path)
        self.precision = precision
        check_locations(self.path)  # external data only beside the model, as for ONNX Runtime
        try:
            open(self.path, "rb").close()
        except PermissionError as e:
            raise unreadable(self.path, e) from None
        core = ov.Core()
        config = {**settings, "PERFORMANCE_HINT": options.performance_hint}
        if options.num_threads:
            config["INFERENCE_NUM_THREADS"] = str(options.num_threads)
        self.cache_dir: Path | None = None
        if options.cache_dir != "":
            key = cache_key(
                sha256, ov.get_version(), str(core.get_property("CPU", "FULL_DEVICE_NAME")),
                [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")], config,
            )
            self.cache_dir = cache_folder(options.cache_dir, key)
        try:
            # Compiling from the path (not a read model) lets a cache hit skip reading the ONNX graph.
            cfg = {**config, **({"CACHE_DIR": str(self.cache_dir)} if self.cache_dir else {})}
            with _cache_lock(self.cache_dir):
                self.compiled = core.compile_model(str(self.path), "CPU", cfg)
        except Exception as e:  # openvino raises its own RuntimeError subtypes
            raise ArtifactError(
                f"OpenVINO cannot load {str(self.path)!r} ({' '.join(str(e).split())[:200]}); "
                "the file is corrupt or from a newer exporter: re-export the model with --force"
            ) from e
        bf16 = settings.get("INFERENCE_PRECISION_HINT") == "bf16"
        if bf16 and self.compiled.get_property("INFERENCE_PRECISION_HINT") != ov.Type.bf16:
            # OpenVINO falls back to f32 where it cannot run bf16: serving that as bf16 would misstate it.
            raise UsageError(
                f"OpenVINO compiled {self.path.name} in "
                f"{self.compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()}, not bf16, on this CPU; "
                "use precision='fp32'"
            )
        self.inputs = [self._io(p) for p in self.compiled.inputs]
        self.outputs = [self._io(p) for p in self.compiled.outputs]
        self._ports = list(self.compiled.outputs)
        self._local = threading.local()

    @staticmethod
    def _io(port: Any) -> IOSpec:
        name = port.get_any_name()
        kind = port.get_element_type().get_type_name()
        if kind not in _DTYPES:
            raise UsageError(f"ONNX tensor {name!r} has type {kind}, which clipdeploy does not feed")
        shape = tuple(
            d.get_length() if d.is_static else f"{name}_dim{i}" for i, d in enumerate(port.get_partial_shape())
        )
        return IOSpec(name, np.dtype(_DTYPES[kind]), shape)

    def describe(self) -> str:
        return "openvino (CPU)"

    def _request(self) -> Any:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self._request()
        request.infer(feed)
        # The request's output tensors are reused by its next call: hand out copies.
        return {spec.name: np.array(request.get_tensor(port).data, copy=True) for spec, port in
                zip(self.outputs, self._ports, strict=True)}


# ---- registration -------------------------------------------------------------------------------------

NAME = "openvino"
TARGET = "openvino-cpu"
INT8_WITHOUT_VNNI = "openvino_int8_without_vnni"  # backend_options key: run int8 on a CPU without VNNI anyway
_OPTIONS = ("openvino_cache_dir", "openvino_performance_hint", INT8_WITHOUT_VNNI)
_X86 = ("x86_64", "amd64", "i386", "i686")

# What is served must be what was gated: the int8 gate runs on ONNX Runtime, and OpenVINO's int8 kernels
# without VNNI measured cosine 0.969 against PyTorch on ViT-B-32 (2-core AVX2 EPYC) where ONNX Runtime's
# gated U8U8 path measured 0.9997. With VNNI, OpenVINO int8 measured 0.9993 (issue 14), so it runs there.
_INT8_REFUSAL = (
    "OpenVINO's int8 on a CPU without VNNI (AVX512-VNNI, AVX-VNNI or AMX) is less accurate than the gated "
    "int8 (cosine 0.969 vs 0.9997 measured on ViT-B-32); use backend='onnxruntime', or pass "
    f"backend_options={{'{INT8_WITHOUT_VNNI}': True}} to run it ungated"
)


def options_from(settings: LoadSettings) -> OvOptions:
    """The OpenVINO options ``load()``'s settings ask for (a bad value is refused here, before any file opens)."""
    return OvOptions(
        num_threads=settings.intra_op_num_threads,
        cache_dir=settings.extra.get("openvino_cache_dir"),
        performance_hint=settings.extra.get("openvino_performance_hint", "LATENCY"),
    )


def _open_file(path: Path, precision: str, settings: LoadSettings) -> Runner:
    """One ONNX file as a ``precision`` variant (quantize's gate): uncached, so no checksum is needed."""
    return OvRunner(path, precision, "", replace(options_from(settings), cache_dir=""))


def _open(view: ArtifactView, precision: str | None, settings: LoadSettings, verify: bool) -> registry.Opened:
    options = options_from(settings)
    preference = registry.get(NAME).preference(settings)  # int8 only with VNNI: see its Runs entry below

    def make(path: Path, v: Variant) -> Runner:
        return OvRunner(path, v.precision, v.sha256, options)

    return registry.open_onnx_files(view, precision, preference, verify, make)


def _unavailable(device: str) -> str | None:
    if device != "cpu":
        return "runs on CPU only; use onnxruntime or tensorrt on a GPU"
    if not registry.has_module("openvino"):
        return "OpenVINO is not installed; pip install 'clipdeploy[openvino]'"
    return None


def _auto(view: ArtifactView, precision: str | None, settings: LoadSettings) -> str | None:
    if registry.first_provider(settings) != "CPUExecutionProvider":
        return "ONNX Runtime providers other than CPU were asked for"
    spec = registry.get(NAME)
    reason = spec.unavailable("cpu")
    if reason is not None:
        return reason
    if platform.machine().lower() not in _X86:
        return f"ranked first only on x86 CPUs (this is {platform.machine()})"
    if not cpu_features.has_vnni():
        # Measured on a 2-core AVX2 EPYC (ViT-B-32 image tower, batch 8): OpenVINO's int8 reached cosine
        # 0.969 against PyTorch and was 1.5x slower than ONNX Runtime's exact U8U8 int8 (0.9997), and
        # the gate runs on ONNX Runtime; so without VNNI, auto keeps ONNX Runtime.
        return "ranked first only on CPUs with VNNI (int8 on OpenVINO without it lost accuracy when measured)"
    if precision is not None and precision not in spec.precisions():
        return f"does not run {precision}"
    want = [precision] if precision is not None else list(spec.preference(settings))
    for tower in view.towers:
        if not any(v.precision in want for v in view.variants_of(tower, "onnx", accepted=True)):
            return f"no accepted {'/'.join(want)} variant of the {tower} tower"
    return None


# auto ranks it before ONNX Runtime on x86 CPUs with VNNI (see _auto for why not without). Measured: ViT-B-32 fp32
# image file, batch 8, 2 threads, a loaded 2-core AMD EPYC (AVX2): OpenVINO 1.05x ONNX Runtime (cosine
# 0.99999994); issue 14's AVX-512 machine: OpenVINO 1.45x ONNX Runtime on the int8 file. It picks int8 first
# (with VNNI only, unless INT8_WITHOUT_VNNI), then bf16 (on CPUs with native bf16, where OpenVINO's bf16 ran
# 1.7x its f32 in the design probes), then fp32.
SPEC = registry.register(BackendSpec(
    NAME, "onnx", ("cpu",), _open, _unavailable,
    target=lambda settings: TARGET, auto=_auto, auto_rank=50, bench_target=lambda device: TARGET,
    runs={
        "int8": Runs(0, cpu_features=tuple(sorted(cpu_features.VNNI_FLAGS)), refusal=_INT8_REFUSAL,
                     anyway_option=INT8_WITHOUT_VNNI),
        "bf16": 1,
        "fp32": 2,
    },
    targets=(TARGET,), check=options_from, options=_OPTIONS, open_file=_open_file,
))
