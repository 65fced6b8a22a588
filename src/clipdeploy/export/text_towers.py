"""What a text tower does with its token ids, and the dynamic-length wrapper for causal towers.

open_clip's ``encode_text`` adds the full context-long positional embedding and the full causal
mask, so it only accepts ids padded to the context length. For a causal tower whose pooled token
is picked from the ids themselves (the EOT argmax, or the first eos id), the output at that
position depends only on the tokens before it: the padding after it cannot change the result. The
wrapper here slices the positional embedding and the causal mask to the input length, so the ONNX
graph takes a dynamic "sequence" axis and a batch is padded only to its longest text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clipdeploy.deps import require

# How ids are padded for the tower, as recorded in the manifest.
PADDING_LONGEST = "longest"  # dynamic "sequence" axis: each batch padded to its longest text
PADDING_MAX_LENGTH = "max_length"  # fixed axis: ids padded to the context length, as trained
# Poolings whose position is read from the ids, so trimming after it is exact on a causal tower.
ID_POOLINGS = ("argmax", "eos")


@dataclass(frozen=True)
class TextLayout:
    """How one model's text tower reads its ids."""

    kind: str  # "builtin" (CLIP keeps the text transformer on itself), "text-transformer", "hf", "other"
    pooling: str  # "argmax", "eos", "last", "first", "cls" (HF pooler), "mean" (HF, masked)
    eos_id: int | None  # the id "eos" pooling looks for; None for other poolings
    pad_id: int | None  # the id the tower treats as padding (masked towers), when it has one
    causal: bool  # attention is causal: a position never sees the ones after it

    @property
    def dynamic(self) -> bool:
        """Whether a dynamic sequence axis is exact: causal attention and a pooled position read from the ids."""
        return self.causal and self.pooling in ID_POOLINGS and self.kind in ("builtin", "text-transformer")

    def to_dict(self) -> dict[str, Any]:
        return {"pooling": self.pooling, "eos_token_id": self.eos_id, "causal": self.causal}


def text_layout(model: Any) -> TextLayout:
    """Read the text tower's pooling and attention from an open_clip model."""
    text = getattr(model, "text", None)
    name = type(text).__name__ if text is not None else ""
    if text is None:  # CLIP: the text transformer lives on the model itself
        return TextLayout(
            kind="builtin",
            pooling=str(model.text_pool_type),
            eos_id=_eos(model.text_pool_type, getattr(model, "text_eos_id", None)),
            pad_id=None,
            causal=getattr(model, "attn_mask", None) is not None,
        )
    if name == "TextTransformer":
        plain = text.cls_emb is None and not text.use_pad_mask
        return TextLayout(
            kind="text-transformer" if plain else "other",
            pooling="last" if text.cls_emb is not None else str(text.pool_type),
            eos_id=_eos(text.pool_type, getattr(text, "eos_id", None)),
            pad_id=int(text.pad_id) if (text.use_pad_mask or text.cls_emb is not None) else None,
            causal=text.attn_mask is not None,
        )
    if name == "HFTextEncoder":
        pooler = type(text.pooler).__name__
        pooling = {"MeanPooler": "mean", "MaxPooler": "max"}.get(pooler, "cls")
        return TextLayout(
            kind="hf",
            pooling=pooling,
            eos_id=None,
            pad_id=int(text.config.pad_token_id),
            causal=False,
        )
    return TextLayout("other", "unknown", None, None, False)


def _eos(pool_type: str, eos_id: Any) -> int | None:
    return int(eos_id) if pool_type == "eos" and eos_id is not None else None


def _parts(model: Any) -> Any:
    """The modules of a causal text tower, wherever the model keeps them."""
    text = getattr(model, "text", None)
    if text is None:
        return model, model.text_pool_type, getattr(model, "text_eos_id", None)
    return text, text.pool_type, getattr(text, "eos_id", None)


def causal_text_forward(model: Any) -> Callable[[Any], Any]:
    """``encode_text`` on ids of any length from 1 to the context length, for a causal tower.

    It performs open_clip's own steps (token embedding, positional embedding, causal transformer,
    final LayerNorm, id-based pooling, projection) with the positional embedding and the causal mask
    sliced to the input length. The caller checks that the tower is causal and pools at a position
    read from the ids (``TextLayout.dynamic``, or the bench's own check): otherwise the result differs.
    """
    torch = require("torch", "export")
    require("open_clip.transformer", "export")
    from open_clip.transformer import text_global_pool

    parts, pool_type, eos_id = _parts(model)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        cast_dtype = parts.transformer.get_cast_dtype()
        x = parts.token_embedding(ids).to(cast_dtype)
        x = x + parts.positional_embedding[:length].to(cast_dtype)
        x = parts.transformer(x, attn_mask=parts.attn_mask[:length, :length])
        x = parts.ln_final(x)
        x = text_global_pool(x, ids, pool_type, eos_token_id=eos_id)
        proj = parts.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
        return x

    return forward


def wrap_forward(model: Any, forward: Callable[[Any], Any], name: str) -> Any:
    """An eval-mode ``torch.nn.Module`` named ``name`` whose forward is ``forward``, holding ``model``'s weights."""
    import torch

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model  # registers the parameters, so export sees them as weights

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return forward(x)

    Tower.__name__ = Tower.__qualname__ = name
    return Tower().eval()


def causal_text_wrapper(model: Any, layout: TextLayout) -> Any:
    """A module computing ``encode_text`` on ids of any length (see ``causal_text_forward``);
    ``layout`` is the model's (``text_layout``).

    The export parity check compares it with ``encode_text`` itself on full-length ids, at several
    lengths.
    """
    if not layout.dynamic:
        raise ValueError(f"the text tower of {type(model).__name__} is not causal with id pooling: {layout}")
    return wrap_forward(model, causal_text_forward(model), "CausalTextTower")
