"""What `clipdeploy export` takes. CLI and API both resolve through ``ExportConfig``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from clipdeploy.export.specs import DEFAULT_OPSET
from clipdeploy.options import opt

MIN_OPSET = 17  # LayerNormalization is a single ONNX node from opset 17 on


@dataclass
class ExportConfig:
    """Everything `clipdeploy export` takes. CLI and API both resolve through this."""

    model: str  # open_clip architecture name, or a name for --model-config
    output: Path  # the artifact directory to create
    pretrained: str | None = field(  # needs network
        default=None, metadata=opt("open_clip pretrained tag, e.g. openai (downloads)", metavar="TAG")
    )
    checkpoint: Path | None = field(
        default=None, metadata=opt("local state_dict or .safetensors file (offline)", metavar="FILE")
    )
    model_config: Path | None = field(
        default=None, metadata=opt("open_clip-format architecture JSON, registered as MODEL", metavar="FILE.json")
    )
    opset: int = field(default=DEFAULT_OPSET, metadata=opt(f"ONNX opset, {MIN_OPSET} or higher"))
    force: bool = field(default=False, metadata=opt("replace an existing artifact at --output"))
    seed: int = field(default=0, metadata=opt("seed for random weights"))  # without pretrained/checkpoint
    # Without it, and without the hub, the artifact records the tokenizer as missing (encode_tokens
    # works, encode_text refuses).
    tokenizer_dir: Path | None = field(
        default=None,
        metadata=opt(
            "folder with the Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json) for models whose "
            "tokenizer open_clip fetches from the hub (SigLIP, CLIPA, roberta, mt5, nllb, ...); save it with "
            "AutoTokenizer.from_pretrained(NAME).save_pretrained(DIR)",
            metavar="DIR",
        ),
    )
    # Reduced-depth proof of a giant that cannot fit at full size: at most this many transformer
    # blocks per tower, random weights only; recorded in the manifest as model.reduced_depth. API and
    # the coverage tool only (no CLI option).
    depth: int | None = None
