"""clipdeploy: a deployment compiler for OpenCLIP models.

``import clipdeploy`` stays light: torch, open_clip, onnx, onnxruntime and tensorrt are imported
only inside the functions that need them.
"""

from __future__ import annotations

from clipdeploy.errors import (
    AccuracyError,
    ArtifactError,
    CheckpointError,
    ClipDeployError,
    DependencyError,
    EngineError,
    ExportError,
    InputError,
    UsageError,
)

__version__ = "0.1.0"

__all__ = [
    "AccuracyError",
    "ArtifactError",
    "CheckpointError",
    "ClipDeployError",
    "DependencyError",
    "EngineError",
    "ExportError",
    "InputError",
    "UsageError",
    "__version__",
]
