"""OpenVINO backend (CPU): runs the artifact's own ONNX variants. ``openvino`` is imported only when a runner is made."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy import precisions
from clipdeploy.errors import ArtifactError, DependencyError, UsageError, unreadable
from clipdeploy.artifact.external_data import check_locations
from clipdeploy.runtime.backends.base import IOSpec, Runner

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
