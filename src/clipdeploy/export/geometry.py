"""What an open_clip model's towers take: the image size and the text context length.

Read by the family specs and by the text-tower layout alike, so it sits below both.
"""

from __future__ import annotations

from typing import Any

from clipdeploy.errors import UsageError


def image_size(model: Any) -> tuple[int, int]:
    """The (height, width) the image tower takes."""
    size = getattr(model.visual, "image_size", None)
    if size is None:
        size = model.visual.preprocess_cfg["size"]
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def context_length(model: Any) -> int:
    """The length of the ids the text tower takes: the tokenizer's context length."""
    length = getattr(model, "clipdeploy_context_length", None)  # set by load_model for HF text towers
    if length is None:
        length = getattr(model, "context_length", None)
    if length is None:
        length = getattr(getattr(model, "text", None), "context_length", None)
    if length is None:
        raise UsageError(
            f"cannot tell the text context length of {type(model).__name__}; "
            "pass a model whose text tower sets context_length"
        )
    return int(length)
