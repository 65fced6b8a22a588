"""The build stage: TensorRT engines from an artifact's typed ONNX variants, and their validation.

``import clipdeploy.build`` needs neither TensorRT nor CUDA; they are imported by the functions that
build and run engines.
"""

from __future__ import annotations

from clipdeploy.build.config import BuildConfig

__all__ = ["BuildConfig", "build_engines", "validate_engines"]


def build_engines(cfg: BuildConfig) -> list[dict]:
    """Compile each tower's ONNX variant of ``cfg.precision``; see :func:`clipdeploy.build.builder.build_engines`."""
    from clipdeploy.build.builder import build_engines as _build

    return _build(cfg)


def validate_engines(artifact: str, **options: object) -> dict:
    """Compare engines with their ONNX sources; see :func:`clipdeploy.build.engine_validate.validate_engines`."""
    from clipdeploy.build.engine_validate import validate_engines as _validate

    return _validate(artifact, **options)  # type: ignore[arg-type]
