"""The PyTorch reference: the open_clip model with the artifact's own weights, rebuilt from its manifest.

Weights come back the way the export made them:
- a pretrained tag: ``open_clip.create_model(name, pretrained=tag)`` (downloads, or open_clip's cache);
- a checkpoint: the file passed with ``--checkpoint``, checked against the manifest's sha256;
- random weights: ``torch.manual_seed(seed)`` then ``create_model``, exactly as the export did.

A custom architecture's ``model_config`` from the manifest is registered first. Imports torch and
open_clip, so it is only ever imported inside functions.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipdeploy.errors import CheckpointError, UsageError
from clipdeploy.export.loading import load_model
from clipdeploy.export.text_towers import causal_text_forward
from clipdeploy.artifact.manifest import file_sha256
from clipdeploy.artifact.view import ModelFacts

# Model names that carry their own weights (open_clip downloads or reads them).
_SOURCE_SCHEMAS = ("hf-hub:", "local-dir:")


def weights_source(model: ModelFacts) -> str:
    """How the artifact's weights were chosen, in words."""
    if model.pretrained:
        return f"pretrained {model.pretrained}"
    if model.checkpoint_sha256:
        return f"checkpoint {model.checkpoint} (sha256 {model.checkpoint_sha256[:12]}…)"
    if model.random_init_seed is not None:
        return f"random weights (seed {model.random_init_seed})"
    if model.name.startswith(_SOURCE_SCHEMAS):
        return f"weights of {model.name}"
    return "unknown weights"


def check_reference_weights(model: ModelFacts, checkpoint: Path | None) -> None:
    """Refuse, before any work, a reference that cannot have the artifact's weights."""
    expected = model.checkpoint_sha256
    if expected:
        if checkpoint is None:
            raise CheckpointError(
                f"the artifact was exported from checkpoint {model.checkpoint!r}; pass it with "
                "--checkpoint FILE so PyTorch runs the same weights, or leave torch out of --backends"
            )
        if not Path(checkpoint).is_file():
            raise CheckpointError(
                f"checkpoint {str(checkpoint)!r} does not exist; pass the file the artifact was exported from"
            )
        actual = file_sha256(Path(checkpoint))
        if actual != expected:
            raise CheckpointError(
                f"checkpoint {str(checkpoint)!r} has sha256 {actual[:12]}…, the artifact was exported from "
                f"{expected[:12]}…; pass the checkpoint the artifact was exported from"
            )
    elif checkpoint is not None:
        raise UsageError(f"--checkpoint was given but the artifact has {weights_source(model)}; drop --checkpoint")
    elif not model.pretrained and model.random_init_seed is None and not model.name.startswith(_SOURCE_SCHEMAS):
        raise UsageError(
            f"the manifest of {model.name!r} says neither a pretrained tag, a checkpoint nor a seed; "
            "re-export the model, or leave torch out of --backends"
        )


def build_reference_model(model: ModelFacts, checkpoint: Path | None = None) -> Any:
    """The eval-mode fp32 CPU open_clip model with the artifact's weights."""
    check_reference_weights(model, checkpoint)
    with tempfile.TemporaryDirectory(prefix="clipdeploy-bench-") as tmp:
        config_path = None
        if model.model_config:
            config_path = Path(tmp) / f"{model.name}.json"
            config_path.write_text(json.dumps(dict(model.model_config)), encoding="utf-8")
        loaded = load_model(
            model.name,
            pretrained=model.pretrained or None,
            checkpoint=checkpoint if model.checkpoint_sha256 else None,
            model_config=config_path,
            seed=int(model.random_init_seed or 0),
        )
    return loaded.model


# ---- text at a shorter length --------------------------------------------------------------------


def prefix_text_encoder(model: Any) -> tuple[Callable[[Any], Any] | None, str]:
    """``encode_text`` for ids shorter than the context length, and why not where it cannot be exact.

    open_clip's ``encode_text`` adds the whole positional embedding, so it takes only full-length
    ids. For a causal text tower that pools at the end token (or the first token), cutting the ids,
    the positional embedding and the causal mask to the same length gives the same embedding: no
    token attends to the padding after it. The forward is the export's own (``export/text_towers.py``).
    """
    if hasattr(model, "token_embedding"):  # CLIP: the text tower lives on the model
        text, pool = model, getattr(model, "text_pool_type", "argmax")
        extra_ok = True
    elif type(getattr(model, "text", None)).__name__ == "TextTransformer":
        text = model.text
        pool = getattr(text, "pool_type", "argmax")
        extra_ok = getattr(text, "cls_emb", None) is None and not getattr(text, "use_pad_mask", False)
    else:
        return None, f"the text tower of {type(model).__name__} is not open_clip's causal transformer"
    if getattr(text, "attn_mask", None) is None or not extra_ok:
        return None, "the text tower is not purely causal, so a shorter input would change the embedding"
    if pool not in ("argmax", "eos", "first"):
        return None, f"the text tower pools with {pool!r}, which depends on the padded length"
    return causal_text_forward(model), ""
