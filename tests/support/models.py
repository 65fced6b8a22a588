"""The micro models of the test suite, by name, as Polygraphy's ``tests/models/meta.py`` lists its models.

Each entry says how the model is made (an open_clip config, a seed, a trainer or a torch-free maker),
what it is for, and the figures tests expect of it, so a new test picks a model here by name instead of
copying a config. Nothing here imports torch, open_clip or onnx: makers import them when called.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from tests.support import synthetic, tiny_artifact

DATA = Path(__file__).resolve().parents[1] / "data"


@dataclass(frozen=True)
class MicroModel:
    """One micro model. ``config`` or ``config_path`` is its open_clip config (neither for the torch-free one)."""

    name: str
    purpose: str
    # "open_clip": exported from an open_clip config; "onnx": tiny ONNX graphs written directly, no torch.
    kind: str
    seed: int | None = None  # torch.manual_seed before the weights are drawn (or training starts)
    config: Mapping[str, Any] | None = None
    config_path: Path | None = None
    # Figures a test may assert: embed_dim, image_size, context_length, the manifest's model family, ...
    expected: Mapping[str, Any] = field(default_factory=dict)
    # A maker: the trainer returning a checkpoint path, or the torch-free artifact writer (root -> root).
    make: Callable[..., Path] | None = None

    def model_config(self) -> dict[str, Any]:
        """The open_clip config as a fresh dict."""
        if self.config_path is not None:
            return json.loads(self.config_path.read_text())
        if self.config is None:
            raise ValueError(f"micro model {self.name!r} is {self.kind}, made without an open_clip config")
        return json.loads(json.dumps(self.config))

    def config_file(self, folder: Path) -> Path:
        """A JSON file of the config, for ``--model-config`` (the shipped file, or one written to ``folder``)."""
        if self.config_path is not None:
            return self.config_path
        path = folder / f"{self.name}.json"
        path.write_text(json.dumps(self.model_config()))
        return path


_CNN_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}

_MODELS = (
    MicroModel(
        "micro-vit", "a tiny random ViT that exports in seconds: runtime, CLI, export and progress tests",
        "open_clip", seed=7, config_path=DATA / "micro-vit.json",
        expected={"family": "vit", "embed_dim": 64, "image_size": 64, "context_length": 77},
    ),
    MicroModel(
        "micro-siglip", "a tiny SigLIP-style model (HF tokenizer, no causal mask, last-token pooling); "
        "no test uses it yet", "open_clip", config_path=DATA / "micro-siglip.json",
        expected={"embed_dim": 64, "image_size": 64, "context_length": 16},
    ),
    MicroModel(
        synthetic.MODEL_NAME, "a micro ViT trained on captioned shapes (cached checkpoint): precision tests "
        "whose gates need real zero-shot structure", "open_clip", seed=0, config=synthetic.CONFIG,
        expected={"family": "vit", "embed_dim": 64, "image_size": synthetic.IMAGE_SIZE, "context_length": 16,
                  "min_top1_agreement": 0.95},
        make=synthetic.trained_checkpoint,
    ),
    MicroModel(
        "micro-resnet", "a random modified-ResNet image tower: the CNN precision paths", "open_clip", seed=0,
        config={"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16,
                                                "head_width": 16}, "text_cfg": _CNN_TEXT},
        expected={"family": "modified-resnet", "embed_dim": 64, "image_size": 64, "min_cosine": 0.98},
    ),
    MicroModel(
        "micro-convnext", "a random timm ConvNeXt-atto image tower: the CNN precision paths", "open_clip", seed=0,
        config={"embed_dim": 64, "vision_cfg": {"timm_model_name": "convnext_atto", "timm_model_pretrained": False,
                                                "timm_pool": "", "timm_proj": "linear", "image_size": 64},
                "text_cfg": _CNN_TEXT},
        expected={"family": "convnext", "embed_dim": 64, "image_size": 64, "min_cosine": 0.98},
    ),
    MicroModel(
        "tiny-onnx", "two ONNX towers of a few nodes and a real manifest, made without torch: engine build, "
        "TensorRT contract and GPU tests (out[i, j] = mean(x[i]) * (j + 1), see tiny_artifact.expected)",
        "onnx",
        expected={"family": "test", "embed_dim": tiny_artifact.EMBED_DIM, "image_size": tiny_artifact.IMAGE_SIZE,
                  "context_length": tiny_artifact.CONTEXT_LENGTH},
        make=tiny_artifact.make_tiny_artifact,
    ),
)

MODELS: Mapping[str, MicroModel] = MappingProxyType({m.name: m for m in _MODELS})


def by_kind(kind: str) -> list[MicroModel]:
    """The models of one kind, in registry order."""
    return [m for m in _MODELS if m.kind == kind]
