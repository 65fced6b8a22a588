"""Record an open_clip model's inference preprocessing in the artifact's JSON form."""

from __future__ import annotations

from typing import Any

from clipdeploy.deps import require
from clipdeploy.errors import ArtifactError, ExportError
from clipdeploy.runtime.preprocess import PreprocessConfig


def describe_preprocess(model: Any) -> dict[str, Any]:
    """The ``PreprocessConfig.to_dict()`` of the transform open_clip would use for ``model`` at inference.

    Mirrors ``create_model_and_transforms``: the model's preprocess cfg merged over
    ``PreprocessCfg`` defaults, then the fallbacks ``image_transform`` applies.
    """
    from dataclasses import asdict

    require("open_clip.model", "export")
    from open_clip.model import get_model_preprocess_cfg
    require("open_clip.transform", "export")
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    # dict() because get_model_preprocess_cfg can hand back (and fill in) the model's own dict.
    try:
        model_cfg = dict(get_model_preprocess_cfg(model))
    except AttributeError as e:
        raise ExportError(
            f"{type(model).__name__} has no open_clip preprocess cfg ({e}); expected a model built by open_clip"
        ) from e
    merged = merge_preprocess_dict(PreprocessCfg(), model_cfg)
    defaults = asdict(PreprocessCfg())

    size = merged["size"]
    if isinstance(size, (list, tuple)) and len(size) == 1:
        size = size[0]
    if not isinstance(size, (list, tuple)):
        size = (size, size)

    # image_transform: falsy mean/std fall back to the OpenAI values; a scalar is used for all bands.
    mean = _per_band(merged["mean"] or defaults["mean"])
    std = _per_band(merged["std"] or defaults["std"])

    interpolation = merged["interpolation"] or "bicubic"
    if interpolation == "random":  # open_clip uses bicubic for 'random' at inference
        interpolation = "bicubic"

    d = {
        "size": list(size),
        "mean": mean,
        "std": std,
        "interpolation": interpolation,
        "resize_mode": merged["resize_mode"] or "shortest",
        "fill_color": merged["fill_color"] or 0,
    }
    try:
        return PreprocessConfig.from_dict(d).to_dict()
    except ArtifactError as e:
        raise ExportError(f"the model's open_clip preprocess cfg is not supported: {e}") from e


def _per_band(v: Any) -> list[Any]:
    # A scalar or one-element mean/std is broadcast over the three bands by torchvision's Normalize.
    values = list(v) if isinstance(v, (list, tuple)) else [v]
    return values * 3 if len(values) == 1 else values
