"""Declarative tower specs, one per model family.

A family says how to recognise a model, what its ONNX boundary is (names, dtypes, named dynamic
axes), which opset to use and how strict the parity check is. A new family is one small entry in
the registry, not a branch in the exporter.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from clipdeploy.errors import UsageError

if TYPE_CHECKING:
    import torch

# Named dynamic axes. The names end up in the ONNX graph and in the manifest, from this one place.
BATCH = "batch"

# Opset 18: LayerNormalization is a single node from opset 17 on (the fp16 pass keeps it in fp32 by
# op type), and 18 is the dynamo exporter's native opset, so no version conversion runs after export.
DEFAULT_OPSET = 18


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output, as the manifest records it."""

    name: str
    dtype: str  # numpy dtype name: "float32", "int64"
    shape: tuple[int | str, ...]  # a str is a named dynamic axis

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Tolerance:
    """How close a variant must be to its reference."""

    min_cosine: float  # lowest cosine similarity allowed for any single embedding
    max_abs_rel: float  # largest abs error allowed, as a fraction of the largest reference magnitude


# The export gate: ONNX fp32 against PyTorch fp32.
FP32_TOLERANCE = Tolerance(min_cosine=0.99999, max_abs_rel=1e-4)


@dataclass(frozen=True)
class TowerSpec:
    """The ONNX boundary of one tower: the public open_clip method it wraps, and its I/O names."""

    tower: str  # "image" or "text"
    method: str  # the open_clip method the wrapper's forward calls
    input_name: str
    output_name: str
    input_dtype: str
    tolerance: Tolerance = FP32_TOLERANCE
    opset: int = DEFAULT_OPSET

    def input_spec(self, model: Any) -> TensorSpec:
        if self.tower == "image":
            height, width = image_size(model)
            return TensorSpec(self.input_name, self.input_dtype, (BATCH, 3, height, width))
        return TensorSpec(self.input_name, self.input_dtype, (BATCH, context_length(model)))

    def output_spec(self, model: Any, embed_dim: int) -> TensorSpec:
        return TensorSpec(self.output_name, "float32", (BATCH, embed_dim))

    def wrap(self, model: Any) -> torch.nn.Module:
        """A tiny module whose forward is the public open_clip method, so ONNX sees the user's API."""
        import torch

        method = getattr(model, self.method)

        class TowerWrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model  # registers the parameters, so export sees them as weights

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return method(x)

        TowerWrapper.__name__ = f"{self.tower.capitalize()}Tower"
        return TowerWrapper().eval()


IMAGE_TOWER = TowerSpec(
    tower="image",
    method="encode_image",
    input_name="pixel_values",
    output_name="image_embeds",
    input_dtype="float32",
)
# Token ids stay int64 end to end: in fp16, 49406 and 49407 (SOT and EOT) are the same number.
TEXT_TOWER = TowerSpec(
    tower="text",
    method="encode_text",
    input_name="input_ids",
    output_name="text_embeds",
    input_dtype="int64",
)


@dataclass(frozen=True)
class FamilySpec:
    """A model family: how to recognise it and how to export its towers."""

    name: str
    description: str
    matches: Callable[[Any], bool]
    towers: tuple[TowerSpec, ...] = (IMAGE_TOWER, TEXT_TOWER)
    # Runs on the model before export, e.g. to reparameterize; must keep the outputs identical.
    prepare: Callable[[Any], Any] | None = None
    priority: int = 0  # higher is tried first; the catch-all family has the lowest
    tested: bool = True  # False: exports go through the parity gate but have no family test yet
    notes: tuple[str, ...] = field(default_factory=tuple)


_FAMILIES: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    """Add a family to the registry. Names are unique."""
    if spec.name in _FAMILIES:
        raise ValueError(f"family {spec.name!r} is registered twice")
    _FAMILIES[spec.name] = spec
    return spec


def list_families() -> list[FamilySpec]:
    return sorted(_FAMILIES.values(), key=lambda f: -f.priority)


def get_family(name: str) -> FamilySpec:
    try:
        return _FAMILIES[name]
    except KeyError:
        close = difflib.get_close_matches(name, _FAMILIES, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(_FAMILIES)}"
        raise UsageError(f"unknown model family {name!r}{hint}") from None


def detect_family(model: Any) -> FamilySpec:
    """The first registered family, by priority, that recognises the model."""
    for family in list_families():
        if family.matches(model):
            return family
    raise UsageError(  # unreachable while the catch-all family is registered
        f"no export family recognises {type(model).__name__}; known: {', '.join(_FAMILIES)}"
    )


# ---- helpers that read a model's geometry -----------------------------------------------------


def image_size(model: Any) -> tuple[int, int]:
    size = getattr(model.visual, "image_size", None)
    if size is None:
        size = model.visual.preprocess_cfg["size"]
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def context_length(model: Any) -> int:
    length = getattr(model, "context_length", None)
    if length is None:
        length = getattr(model.text, "context_length", None)
    if length is None:
        raise UsageError(
            f"cannot tell the text context length of {type(model).__name__}; "
            "pass a model whose text tower sets context_length"
        )
    return int(length)


def _visual_class(model: Any) -> str:
    return type(getattr(model, "visual", None)).__name__


def _has_builtin_text(model: Any) -> bool:
    # CLIP keeps the text transformer on the model itself; CustomTextCLIP has `model.text`.
    text = getattr(model, "text", None)
    return text is None or type(text).__name__ == "TextTransformer"


register_family(
    FamilySpec(
        name="vit",
        description="open_clip VisionTransformer image tower with a causal text transformer "
        "(OpenAI, LAION, DataComp, DFN, MetaCLIP, -quickgelu, -plus)",
        matches=lambda m: _visual_class(m) == "VisionTransformer" and _has_builtin_text(m),
        priority=10,
    )
)
register_family(
    FamilySpec(
        name="modified-resnet",
        description="OpenAI ModifiedResNet image tower (RN50, RN101, RN50x4, ...) with a causal "
        "text transformer",
        matches=lambda m: _visual_class(m) == "ModifiedResNet" and _has_builtin_text(m),
        priority=10,
    )
)
register_family(
    FamilySpec(
        name="open_clip",
        description="any other open_clip model, exported through encode_image / encode_text; "
        "the parity gate decides whether the result is accepted",
        matches=lambda m: hasattr(m, "encode_image") and hasattr(m, "encode_text"),
        priority=-100,
        tested=False,
    )
)
