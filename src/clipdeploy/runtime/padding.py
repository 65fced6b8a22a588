"""Padding of token ids for the text tower: full context length, or trimmed to the batch's longest text.

A causal text tower with id-based pooling (the EOT argmax, or the first eos id) reads nothing after
the pooled position, so ids may be cut right after the latest pooled position in the batch without
changing any embedding. The exporter proves this on every dynamic-length artifact with these very
functions; the runtime uses them to pad each batch only as far as it needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from clipdeploy.errors import ArtifactError, InputError

__all__ = ["PADDINGS", "pooled_positions", "trim_padding", "trim_to_pooled"]

PADDINGS = ("longest", "max_length")


def pooled_positions(ids: np.ndarray, pooling: str, eos_id: int | None = None) -> np.ndarray:
    """The position each row's embedding is read from, as open_clip's ``text_global_pool`` picks it."""
    if pooling == "argmax":
        return np.argmax(ids, axis=1)  # first maximum, like torch.argmax and ONNX ArgMax
    if pooling == "eos":
        if eos_id is None:
            raise ArtifactError("manifest text pooling is 'eos' without an eos_token_id; re-export the artifact")
        return np.argmax(ids == eos_id, axis=1)  # first eos, or 0 when a row has none, as open_clip does
    raise ArtifactError(
        f"text pooling {pooling!r} does not read its position from the ids; only 'argmax' and 'eos' towers "
        "take trimmed ids; re-export the artifact"
    )


def trim_to_pooled(ids: np.ndarray, pooling: str, eos_id: int | None = None, *, min_length: int = 1) -> np.ndarray:
    """Drop the columns after the latest pooled position of the batch (exact on causal towers)."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise InputError(f"token ids have shape {list(ids.shape)}; pass a 2-D [N, L] array with N >= 1")
    if ids.shape[1] == 0:
        raise InputError("token ids have no columns; pass ids from session.tokenize")
    keep = max(int(pooled_positions(ids, pooling, eos_id).max()) + 1, min_length)
    return ids[:, : min(keep, ids.shape[1])] if keep < ids.shape[1] else ids


def trim_padding(ids: np.ndarray, pad_id: Any = 0, *, min_length: int = 1) -> np.ndarray:
    """Drop the trailing columns that are padding in every row ("longest" padding)."""
    ids = np.asarray(ids)
    used = np.flatnonzero((ids != pad_id).any(axis=0))
    keep = max(int(used[-1]) + 1 if used.size else 0, min_length)
    return ids[:, :keep] if keep < ids.shape[1] else ids
