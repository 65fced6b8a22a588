"""clipdeploy: a deployment compiler for OpenCLIP models.

``import clipdeploy`` stays light: torch, open_clip, onnx, onnxruntime and tensorrt are imported
only inside the functions that need them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from clipdeploy.errors import (
    AccuracyError,
    ArtifactError,
    CalibrationError,
    CheckpointError,
    ClipDeployError,
    DependencyError,
    EngineError,
    ExportError,
    InputError,
    UsageError,
)

if TYPE_CHECKING:
    from clipdeploy.bulk.batch import BatchResult
    from clipdeploy.runtime.session import ClipSession

__version__ = "0.1.0"

__all__ = [
    "AccuracyError",
    "ArtifactError",
    "CalibrationError",
    "CheckpointError",
    "ClipDeployError",
    "DependencyError",
    "EngineError",
    "ExportError",
    "InputError",
    "UsageError",
    "__version__",
    "embed_batch",
    "load",
]


def load(
    path: str | os.PathLike[str], backend: str = "auto", precision: str | None = None, **options: Any
) -> ClipSession:
    """Open an artifact directory for embedding; see :func:`clipdeploy.runtime.session.load`."""
    # here, not at the top: `import clipdeploy` stays light (no numpy, no runtime)
    from clipdeploy.runtime.session import load as _load

    return _load(path, backend=backend, precision=precision, **options)


def embed_batch(session: ClipSession, items: Any, *, texts: bool = False, fast_decode: bool = False) -> BatchResult:
    """Embed one batch, keeping unreadable items out; see :func:`clipdeploy.bulk.batch.embed_batch`."""
    # here, not at the top: `import clipdeploy` stays light (no numpy, no runtime)
    from clipdeploy.bulk.batch import embed_batch as _embed_batch

    return _embed_batch(session, items, texts=texts, fast_decode=fast_decode)
