"""A typed, read-only view of a manifest: what every stage asks of an artifact, answered in one place.

``ArtifactView.read(dir)`` (or ``ArtifactView.of(dir, manifest_dict)``) gives the model's facts, each
tower's inputs and text layout, the preprocessing and tokenizer entries, and the variants. Stages use
these properties instead of string keys, so that a question such as "what is the context length?" has
one answer (``context_length``) rather than one per stage. The raw dict stays reachable as ``raw``
(read-only) for the rare key with no property yet; writers still go through ``updating_manifest``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from clipdeploy.artifact.manifest import Variant, read_manifest, variants
from clipdeploy.errors import ArtifactError

__all__ = ["ArtifactView", "ModelFacts", "TensorSpec", "TowerFacts"]


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a tower: its name, dtype and shape (named dynamic axes are strings)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), str(d["dtype"]), tuple(d.get("shape") or ()))

    @property
    def fixed(self) -> tuple[int | None, ...]:
        """The shape with each dynamic axis as None."""
        return tuple(v if isinstance(v, int) else None for v in self.shape)


@dataclass(frozen=True)
class TowerFacts:
    """One tower as the exporter recorded it."""

    name: str  # "image" or "text"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    embed_dim: int
    # Text towers only: how ids are padded ("longest" = dynamic length), where the embedding is pooled
    # ("argmax", "eos", "last", "first"), the eos id for "eos" pooling, causality and the length range.
    padding: str | None = None
    pooling: str | None = None
    eos_token_id: int | None = None
    causal: bool | None = None
    context_length: int | None = None
    sequence: Mapping[str, int] | None = None

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> TowerFacts:
        return cls(
            name=name,
            inputs=tuple(TensorSpec.from_dict(x) for x in d.get("inputs") or ()),
            outputs=tuple(TensorSpec.from_dict(x) for x in d.get("outputs") or ()),
            embed_dim=int(d.get("embed_dim") or 0),
            padding=d.get("padding"),
            pooling=d.get("pooling"),
            eos_token_id=d.get("eos_token_id"),
            causal=d.get("causal"),
            context_length=int(d["context_length"]) if d.get("context_length") else None,
            sequence=MappingProxyType(dict(d["sequence"])) if isinstance(d.get("sequence"), Mapping) else None,
        )

    @property
    def input(self) -> TensorSpec:
        """The tower's one input (every tower has exactly one)."""
        if len(self.inputs) != 1:
            raise ArtifactError(f"the {self.name} tower has {len(self.inputs)} inputs, expected 1; re-export the artifact")
        return self.inputs[0]

    @property
    def output(self) -> TensorSpec:
        if len(self.outputs) != 1:
            raise ArtifactError(f"the {self.name} tower has {len(self.outputs)} outputs, expected 1; re-export the artifact")
        return self.outputs[0]

    @property
    def dynamic_length(self) -> bool:
        """A text tower that takes ids padded only to the batch's longest text."""
        return self.padding == "longest"


@dataclass(frozen=True)
class ModelFacts:
    """The model an artifact was exported from."""

    name: str
    pretrained: str | None
    family: str | None
    embed_dim: int
    logit_scale: float
    logit_bias: float | None
    checkpoint_sha256: str | None = None
    checkpoint: str | None = None  # the checkpoint file's name, when the weights came from one
    random_init_seed: int | None = None  # set when the weights are random (no pretrained tag, no checkpoint)
    model_config: Mapping[str, Any] | None = None  # the open_clip model config, when not a built-in one

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelFacts:
        bias = d.get("logit_bias")
        config = d.get("model_config")
        return cls(
            name=str(d.get("name")),
            pretrained=d.get("pretrained"),
            family=d.get("family"),
            embed_dim=int(d.get("embed_dim") or 0),
            logit_scale=float(d.get("logit_scale") or 1.0),
            logit_bias=None if bias is None else float(bias),
            checkpoint_sha256=d.get("checkpoint_sha256"),
            checkpoint=d.get("checkpoint"),
            random_init_seed=d.get("random_init_seed"),
            model_config=MappingProxyType(dict(config)) if isinstance(config, Mapping) else None,
        )


@dataclass(frozen=True)
class ArtifactView:
    """Everything a stage reads from an artifact's manifest, typed. Build with ``read`` or ``of``."""

    root: Path
    raw: Mapping[str, Any] = field(repr=False)  # the manifest as read (read-only)
    model: ModelFacts
    towers: Mapping[str, TowerFacts]
    variants: tuple[Variant, ...]

    @classmethod
    def read(cls, root: str | os.PathLike[str]) -> ArtifactView:
        """Read and check ``root/manifest.json`` (one-line ArtifactError when it is missing or bad)."""
        return cls.of(root, read_manifest(root))

    @classmethod
    def of(cls, root: str | os.PathLike[str], manifest: Mapping[str, Any]) -> ArtifactView:
        """The view of a manifest already read (e.g. one being updated under the artifact lock)."""
        towers = manifest.get("towers") or {}
        return cls(
            root=Path(root),
            raw=MappingProxyType(dict(manifest)),
            model=ModelFacts.from_dict(manifest.get("model") or {}),
            towers=MappingProxyType({t: TowerFacts.from_dict(t, d) for t, d in towers.items()}),
            variants=tuple(variants(dict(manifest))),
        )

    # ---- provenance ----------------------------------------------------------------------------

    @property
    def schema_version(self) -> str:
        return str(self.raw.get("schema_version"))

    @property
    def created(self) -> str | None:
        """When the artifact was exported (ISO 8601), if recorded."""
        return self.raw.get("created")

    @property
    def tools(self) -> Mapping[str, str | None]:
        """The distributions (and clipdeploy) that made the artifact -> their versions."""
        return MappingProxyType(dict(self.raw.get("tools") or {}))

    # ---- model and inputs ----------------------------------------------------------------------

    @property
    def preprocess(self) -> Mapping[str, Any]:
        return MappingProxyType(dict(self.raw.get("preprocess") or {}))

    @property
    def tokenizer(self) -> Mapping[str, Any]:
        return MappingProxyType(dict(self.raw.get("tokenizer") or {}))

    @property
    def tokenizer_missing(self) -> Mapping[str, Any] | None:
        """Why the tokenizer's files are absent (the export could not fetch them), or None when they are there."""
        missing = self.tokenizer.get("missing")
        return MappingProxyType(dict(missing)) if missing else None

    @property
    def files(self) -> Mapping[str, str]:
        """Artifact files outside the variants (tokenizer, preprocessing) -> sha256."""
        return MappingProxyType(dict(self.raw.get("files") or {}))

    @property
    def image_size(self) -> tuple[int, int]:
        """The image tower's input (height, width)."""
        size = self.preprocess.get("size")
        if isinstance(size, int):
            return (size, size)
        if isinstance(size, (list, tuple)) and len(size) == 2:
            return (int(size[0]), int(size[1]))
        shape = self.tower("image").input.shape
        return (int(shape[-2]), int(shape[-1]))

    @property
    def context_length(self) -> int | None:
        """The text tower's context length: THE one definition every stage uses.

        The text tower's own record, else the tokenizer's, else the text input's fixed width; None
        when the artifact has no text tower.
        """
        text = self.towers.get("text")
        if text is None:
            return None
        if text.context_length:
            return text.context_length
        if self.tokenizer.get("context_length"):
            return int(self.tokenizer["context_length"])
        width = text.inputs[0].shape[-1] if text.inputs and text.inputs[0].shape else None
        return width if isinstance(width, int) else None

    @property
    def text_is_dynamic(self) -> bool:
        """The text tower takes ids padded to the batch's longest text (a dynamic sequence axis)."""
        text = self.towers.get("text")
        return bool(text and text.dynamic_length)

    def tower(self, name: str) -> TowerFacts:
        if name not in self.towers:
            raise ArtifactError(f"this artifact has no {name} tower; re-export the model")
        return self.towers[name]

    def tower_inputs(self, name: str) -> tuple[TensorSpec, ...]:
        return self.tower(name).inputs

    def with_towers(self, names: Iterable[str]) -> ArtifactView:
        """The same artifact with only ``names`` among its ``towers`` (to open some towers alone); ``raw`` and the
        variants are unchanged."""
        keep = set(names)
        return replace(self, towers=MappingProxyType({t: f for t, f in self.towers.items() if t in keep}))

    # ---- variants ------------------------------------------------------------------------------

    def variant(self, tower: str, precision: str, format: str = "onnx") -> Variant | None:
        """The variant of ``tower`` at ``precision`` in ``format``, or None."""
        for v in self.variants:
            if v.tower == tower and v.precision == precision and v.format == format:
                return v
        return None

    def variants_of(self, tower: str | None = None, format: str | None = None, *, accepted: bool = False
                    ) -> list[Variant]:  # fmt: skip
        """The variants, filtered by tower, format and whether they passed their gate."""
        return [v for v in self.variants if (tower is None or v.tower == tower)
                and (format is None or v.format == format) and (not accepted or v.accepted)]  # fmt: skip

    def validation(self, *keys: str) -> Any:
        """``manifest["validation"][k1][k2]...``, or None where a key is missing."""
        node: Any = self.raw.get("validation") or {}
        for key in keys:
            if not isinstance(node, Mapping) or key not in node:
                return None
            node = node[key]
        return node
