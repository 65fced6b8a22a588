"""Declarative tower specs, one per model family.

A family says how to recognise a model, what its ONNX boundary is (names, dtypes, named dynamic
axes), which opset to use and how strict the parity check is. A new family is one small entry in
the registry, not a branch in the exporter.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from clipdeploy.deps import require
from clipdeploy.errors import UsageError
from clipdeploy.export.geometry import TowerGeometry
from clipdeploy.export.text_towers import PADDING_LONGEST, PADDING_MAX_LENGTH, causal_text_wrapper, wrap_forward

if TYPE_CHECKING:
    torch = require("torch", "export")

# Named dynamic axes. The names end up in the ONNX graph and in the manifest, from this one place.
BATCH = "batch"
SEQUENCE = "sequence"  # text length, on causal text towers only (see export/text_towers.py)
# The shortest text the dynamic axis accepts: one id. A real text has at least SOT and EOT, but a
# caller's own ids may be shorter, and the causal wrapper is exact at any length.
MIN_SEQUENCE = 1

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
    # Text only. "longest": export a dynamic SEQUENCE axis when the model's text tower is causal with
    # id-based pooling (checked on the model; else it falls back to "max_length"). "max_length": ids
    # padded to the context length, as the tower was trained (SigLIP, HF towers, CoCa, bidirectional).
    padding: str = PADDING_MAX_LENGTH

    def dynamic_sequence(self, geometry: TowerGeometry) -> bool:
        """Whether this tower is exported with a dynamic sequence axis for a model of this geometry."""
        return self.tower == "text" and self.padding == PADDING_LONGEST and geometry.text.dynamic

    def input_spec(self, geometry: TowerGeometry) -> TensorSpec:
        if self.tower == "image":
            height, width = geometry.image_size
            return TensorSpec(self.input_name, self.input_dtype, (BATCH, 3, height, width))
        length: int | str = SEQUENCE if self.dynamic_sequence(geometry) else geometry.context_length
        return TensorSpec(self.input_name, self.input_dtype, (BATCH, length))

    def output_spec(self, embed_dim: int) -> TensorSpec:
        return TensorSpec(self.output_name, "float32", (BATCH, embed_dim))

    def manifest_entry(self, geometry: TowerGeometry, embed_dim: int) -> dict[str, Any]:
        """The tower's entry in the manifest's "towers": its ONNX boundary and, for text, how ids are padded."""
        entry: dict[str, Any] = {
            "inputs": [self.input_spec(geometry).to_dict()],
            "outputs": [self.output_spec(embed_dim).to_dict()],
            "embed_dim": embed_dim,
        }
        if self.tower == "text":
            dynamic = self.dynamic_sequence(geometry)
            length = geometry.context_length
            entry.update(
                {
                    # "longest": pad each batch to its longest text (the runtime trims after the pooled
                    # position); "max_length": pad every text to the context length, as trained.
                    "padding": PADDING_LONGEST if dynamic else PADDING_MAX_LENGTH,
                    **geometry.text.to_dict(),
                    "context_length": length,
                    "sequence": {"min": MIN_SEQUENCE, "max": length} if dynamic else {"min": length, "max": length},
                }
            )
        return entry

    def wrap(self, model: Any, geometry: TowerGeometry) -> torch.nn.Module:
        """A tiny module whose forward is the public open_clip method, so ONNX sees the user's API.

        A dynamic-length text tower is the exception: ``encode_text`` adds the full-length positional
        embedding, so its wrapper performs the same steps sliced to the input length.
        """
        if self.dynamic_sequence(geometry):
            return causal_text_wrapper(model, geometry.text)
        return wrap_forward(model, getattr(model, self.method), f"{self.tower.capitalize()}Tower")


IMAGE_TOWER = TowerSpec(
    tower="image",
    method="encode_image",
    input_name="pixel_values",
    output_name="image_embeds",
    input_dtype="float32",
)
# Token ids stay int64 end to end: in fp16, 49406 and 49407 (SOT and EOT) are the same number.
# Padded to the context length, as trained: SigLIP, HF text towers, CoCa, bidirectional towers.
TEXT_TOWER = TowerSpec(
    tower="text",
    method="encode_text",
    input_name="input_ids",
    output_name="text_embeds",
    input_dtype="int64",
)
# Causal towers with EOT/eos pooling: a dynamic sequence axis, each batch padded to its longest text.
CAUSAL_TEXT_TOWER = replace(TEXT_TOWER, padding=PADDING_LONGEST)


@dataclass(frozen=True)
class FamilySpec:
    """A model family: how to recognise it and how to export its towers."""

    name: str
    description: str
    matches: Callable[[Any], bool]
    towers: tuple[TowerSpec, ...] = (IMAGE_TOWER, CAUSAL_TEXT_TOWER)
    # Runs on the model before export and returns the model to export (e.g. reparameterized); the
    # exporter then checks the ONNX against both the original and the prepared model.
    prepare: Callable[[Any], Any] | None = None
    priority: int = 0  # higher is tried first; the catch-all family has the lowest
    tested: bool = True  # False: exports go through the parity gate but have no family test yet
    representative: str | None = None  # the architecture CI exports for this family
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


# ---- helpers that tell the families apart -----------------------------------------------------


def _visual_class(model: Any) -> str:
    return type(getattr(model, "visual", None)).__name__


def _text_class(model: Any) -> str:
    return type(getattr(model, "text", None)).__name__


def _has_builtin_text(model: Any) -> bool:
    # CLIP keeps the text transformer on the model itself; CustomTextCLIP has `model.text`.
    text = getattr(model, "text", None)
    return text is None or type(text).__name__ == "TextTransformer"


def timm_architecture(model: Any) -> str:
    """The timm model name of a TimmModel image tower ('' for other towers)."""
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    cfg = getattr(trunk, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or "")


def _timm(*prefixes: str, contains: str = "") -> Callable[[Any], bool]:
    def match(model: Any) -> bool:
        arch = timm_architecture(model)
        return bool(arch) and arch.startswith(prefixes) and contains in arch

    return match


def reparameterize(model: Any) -> Any:
    """MobileCLIP: fuse the train-time branches (MobileOne / RepMixer) into single convolutions.

    Works on a copy, so the exporter can still check the ONNX against the original model.
    """
    import copy

    require("timm.utils", "export")
    from timm.utils import reparameterize_model

    return reparameterize_model(copy.deepcopy(model)).eval()


# ---- the families ------------------------------------------------------------------------------

register_family(
    FamilySpec(
        name="coca",
        description="CoCa: the contrastive image and text towers only (captioning is out of scope); the text "
        "tower appends a CLS token and pads as trained",
        matches=lambda m: type(m).__name__ == "CoCa",
        towers=(IMAGE_TOWER, TEXT_TOWER),
        priority=40,
        representative="coca_ViT-B-32",
        notes=("CoCa's encode_image/encode_text return normalized embeddings",),
    )
)
register_family(
    FamilySpec(
        name="hf-text",
        description="a Hugging Face text tower (roberta, xlm-roberta, mt5, nllb) with masked mean or CLS "
        "pooling, padded to the context length; built offline from a bundled config",
        matches=lambda m: _text_class(m) == "HFTextEncoder",
        towers=(IMAGE_TOWER, TEXT_TOWER),
        priority=35,
        representative="roberta-ViT-B-32",
    )
)
register_family(
    FamilySpec(
        name="mobileclip",
        description="MobileCLIP / MobileCLIP2 FastViT-MCi and MCi-ViT image towers, reparameterized before "
        "export and checked against both the original and the reparameterized model",
        matches=_timm("fastvit_mci", "vit_base_mci"),
        prepare=reparameterize,
        priority=30,
        representative="MobileCLIP-S1",
    )
)
register_family(
    FamilySpec(
        name="siglip",
        description="SigLIP / SigLIP2 (incl. i18n, SO400M, gopt): timm ViT image tower with MAP pooling, "
        "bidirectional text tower with last-token pooling padded to max_length, and a logit bias",
        matches=_timm("vit_", contains="siglip"),
        towers=(IMAGE_TOWER, TEXT_TOWER),
        priority=30,
        representative="ViT-B-16-SigLIP",
    )
)
register_family(
    FamilySpec(
        name="pe-core",
        description="Perception Encoder PE-Core: timm ViT with rotary embeddings and attention pooling, "
        "causal text tower (context 32 or 72)",
        matches=_timm("vit_pe_core"),
        priority=30,
        representative="PE-Core-T-16-384",
    )
)
register_family(
    FamilySpec(
        name="eva",
        description="EVA01 / EVA02 timm image towers with a causal text tower",
        matches=_timm("eva"),
        priority=20,
        representative="EVA02-B-16",
    )
)
register_family(
    FamilySpec(
        name="convnext",
        description="ConvNeXt timm image towers with a causal text tower",
        matches=_timm("convnext"),
        priority=20,
        representative="convnext_tiny",
    )
)
register_family(
    FamilySpec(
        name="vitamin",
        description="ViTamin timm image towers (conv stem + ViT) with a causal text tower",
        matches=_timm("vitamin"),
        priority=20,
        representative="ViTamin-S",
    )
)
register_family(
    FamilySpec(
        name="swin",
        description="Swin Transformer timm image towers with a causal text tower",
        matches=_timm("swin"),
        priority=20,
        representative="swin_base_patch4_window7_224",
    )
)
register_family(
    FamilySpec(
        name="timm-vit",
        description="other timm ViT image towers (vit_relpos, vit_medium gap, MobileCLIP2-L-14's ViT-L) with "
        "an open_clip text tower",
        matches=_timm("vit_"),
        priority=15,
        representative="vit_relpos_medium_patch16_cls_224",
    )
)
register_family(
    FamilySpec(
        name="vit",
        description="open_clip VisionTransformer image tower with the built-in text transformer (OpenAI, "
        "LAION, DataComp, DFN, MetaCLIP, CLIPA, -quickgelu, -plus, worldwide)",
        matches=lambda m: _visual_class(m) == "VisionTransformer" and _has_builtin_text(m),
        priority=10,
        representative="ViT-B-32",
    )
)
register_family(
    FamilySpec(
        name="modified-resnet",
        description="OpenAI ModifiedResNet image tower (RN50, RN101, RN50x4, ...) with a causal "
        "text transformer",
        matches=lambda m: _visual_class(m) == "ModifiedResNet" and _has_builtin_text(m),
        priority=10,
        representative="RN50",
    )
)
register_family(
    FamilySpec(
        name="open_clip",
        description="any other open_clip model, exported through encode_image / encode_text; "
        "the parity gate decides whether the result is accepted",
        matches=lambda m: hasattr(m, "encode_image") and hasattr(m, "encode_text"),
        towers=(IMAGE_TOWER, TEXT_TOWER),
        priority=-100,
        tested=False,
    )
)
