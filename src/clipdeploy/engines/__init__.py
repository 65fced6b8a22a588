"""The build stage: TensorRT engines from an artifact's typed ONNX variants, and their validation.

``import clipdeploy.engines`` needs neither TensorRT nor CUDA; they are imported by the functions that
build and run engines.
"""

from __future__ import annotations

from clipdeploy.engines.config import BuildConfig

__all__ = ["BuildConfig", "build_engines", "validate_engines"]


def build_engines(cfg: BuildConfig) -> list[dict]:
    """Compile each tower's ONNX variant of ``cfg.precision``; see :func:`clipdeploy.engines.builder.build_engines`."""
    # here, not at the top: importing the package must not load its heavier modules
    from clipdeploy.engines.builder import build_engines as _build

    return _build(cfg)


def validate_engines(artifact: str, **options: object) -> dict:
    """Compare engines with their ONNX sources; see :func:`clipdeploy.engines.validate.validate_engines`."""
    # here, not at the top: importing the package must not load its heavier modules
    from clipdeploy.engines.validate import validate_engines as _validate

    return _validate(artifact, **options)  # type: ignore[arg-type]
