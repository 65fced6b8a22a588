"""TensorRT version and compatibility policy, shared by the engine builder and the runtime backend.

Which TensorRT is importable, how its version is compared (plans are tied to MAJOR.MINOR.PATCH), the
manifest's hardware-compatibility spellings, when an engine fits a GPU and a TensorRT version, and the
one process-wide TensorRT logger. ``tensorrt`` itself is imported only by :func:`import_tensorrt`.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

from packaging.version import InvalidVersion, Version

from clipdeploy.errors import ArtifactError, DependencyError
from clipdeploy.runtime import cuda

log = logging.getLogger(__name__)

# Manifest spelling -> TensorRT HardwareCompatibilityLevel member.
HARDWARE_COMPAT = {"none": "NONE", "same-compute-capability": "SAME_COMPUTE_CAPABILITY", "ampere-plus": "AMPERE_PLUS"}


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or a DependencyError that says what to install."""
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer is not
        if not cuda.gpu_present():
            # Installing TensorRT would not help here: say what is really missing.
            raise DependencyError(
                f"TensorRT engines need an NVIDIA GPU, and {cuda.NO_GPU}; build and run engines on a GPU machine "
                "(ONNX variants run here: backend='onnxruntime', CLI --backend onnxruntime)"
            ) from e
        raise DependencyError(
            f"TensorRT is not installed or does not load ({e}); install it with {cuda.INSTALL_HINT}"
        ) from e
    return tensorrt


def base_version(version: str) -> str:
    """MAJOR.MINOR.PATCH of a TensorRT version: plans are tied to it, not to the wheel's build suffix."""
    try:
        return ".".join(str(p) for p in Version(version).release[:3])
    except InvalidVersion:
        raise ArtifactError(
            f"TensorRT version {version!r} in the manifest is not a version; rebuild the engine"
        ) from None


# ---- logging ------------------------------------------------------------------------------------

_LOGGERS: dict[int, Any] = {}
_LOGGERS_LOCK = threading.Lock()


def make_logger(trt: Any, keep: int = 400) -> Any:
    """A TensorRT ILogger that forwards to Python logging and keeps recent messages for error reports.

    The subclass is made here, not at import, so that importing this module never needs TensorRT.
    """

    class CapturingLogger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self._lines: deque[tuple[int, str]] = deque(maxlen=keep)
            self._count = 0
            self._lock = threading.Lock()

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)  # 0 internal error, 1 error, 2 warning, 3 info, 4 verbose
            if level >= 4:
                return
            log.log((logging.ERROR, logging.ERROR, logging.WARNING, logging.INFO)[level], "TensorRT: %s", msg)
            with self._lock:
                self._count += 1
                self._lines.append((self._count, f"{('INTERNAL ERROR', 'ERROR', 'WARNING', 'INFO')[level]}: {msg}"))

        def mark(self) -> int:
            """A position in the log; ``tail(mark)`` gives what came after it."""
            with self._lock:
                return self._count

        def tail(self, since: int = 0, lines: int = 8) -> str:
            with self._lock:
                recent = [text for n, text in self._lines if n > since]
            errors = [t for t in recent if "ERROR" in t.split(":", 1)[0]]
            picked = (errors or recent)[-lines:]
            return " | ".join(" ".join(t.split()) for t in picked) or "TensorRT logged nothing"

    return CapturingLogger()


def clear_loggers() -> None:
    """Forget the process's TensorRT loggers (tests swap the ``tensorrt`` module between scenarios)."""
    with _LOGGERS_LOCK:
        _LOGGERS.clear()


def get_logger(trt: Any) -> Any:
    """The one TensorRT logger of this process."""
    with _LOGGERS_LOCK:
        if id(trt) not in _LOGGERS:
            _LOGGERS[id(trt)] = make_logger(trt)
        return _LOGGERS[id(trt)]


# ---- choosing an engine -------------------------------------------------------------------------


def engine_mismatch(entry: dict[str, Any], gpu: cuda.GpuInfo, version: str) -> str | None:
    """Why the engine described by ``entry`` cannot run on ``gpu`` with TensorRT ``version``; None if it can."""
    reasons = []
    built = str(entry.get("tensorrt_version", "?"))
    try:
        here, then = Version(version), Version(built)
    except InvalidVersion:
        return f"TensorRT {built} (an unreadable version)"
    if entry.get("version_compatible"):
        if here.major != then.major or here < then:
            reasons.append(
                f"TensorRT {then.major}.x from {base_version(built)} on (version-compatible), this is {version}"
            )
    elif base_version(built) != base_version(version):
        reasons.append(f"TensorRT {base_version(built)}, this is TensorRT {base_version(version)}")
    level = entry.get("hardware_compatibility", "none")
    built_cc = str(entry.get("compute_capability", "?"))
    if level == "ampere-plus":
        if gpu.compute_capability < (8, 0):
            reasons.append(f"Ampere or newer GPUs (compute capability 8.0+), this {gpu.name} is {gpu.cc}")
    elif built_cc != gpu.cc:
        reasons.append(f"compute capability {built_cc} ({entry.get('gpu', '?')}), this {gpu.name} is {gpu.cc}")
    return "; ".join(reasons) or None
