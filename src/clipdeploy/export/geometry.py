"""What an open_clip model's towers take, read from the torch module once, when the model is loaded.

The family specs, the tracer and the parity checks all take a ``TowerGeometry``; none of them reads
these facts off the torch module again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clipdeploy.errors import UsageError
from clipdeploy.export.text_towers import TextLayout, text_layout


@dataclass(frozen=True)
class TowerGeometry:
    """The inputs of one model's towers."""

    image_size: tuple[int, int]  # (height, width) the image tower takes
    context_length: int  # the length of the ids the text tower takes: the tokenizer's context length
    text: TextLayout  # how the text tower reads its ids (pooling, eos id, causal attention)
    vocab_size: int | None  # the text tower's vocabulary size, where the model states it


def read_geometry(model: Any, *, context_length: int | None = None) -> TowerGeometry:
    """The geometry of ``model``'s towers. ``context_length`` overrides what the model reports (an HF
    text tower reports its position table's length, not the length of the ids it is given)."""
    text = getattr(model, "text", None)
    vocab = getattr(model, "vocab_size", 0) or getattr(text, "vocab_size", 0)
    return TowerGeometry(
        image_size=_image_size(model),
        context_length=int(context_length) if context_length is not None else _context_length(model),
        text=text_layout(model),
        vocab_size=int(vocab) if vocab else None,
    )


def _image_size(model: Any) -> tuple[int, int]:
    size = getattr(model.visual, "image_size", None)
    if size is None:
        size = model.visual.preprocess_cfg["size"]
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _context_length(model: Any) -> int:
    length = getattr(model, "context_length", None)
    if length is None:
        length = getattr(getattr(model, "text", None), "context_length", None)
    if length is None:
        raise UsageError(
            f"cannot tell the text context length of {type(model).__name__}; "
            "pass a model whose text tower sets context_length"
        )
    return int(length)
