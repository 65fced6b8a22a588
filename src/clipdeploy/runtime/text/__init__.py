"""The torch-free tokenizers an artifact's manifest names: open_clip's CLIP BPE and Hugging Face's.

``openai_bpe``: open_clip's ``SimpleTokenizer``; ``hf``: its ``HFTokenizer`` and ``SigLipTokenizer``;
``common``: the cleaning and checks both share. ``load_tokenizer`` picks one from the manifest entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipdeploy.errors import ArtifactError
from clipdeploy.runtime.text.common import CLEAN_MODES
from clipdeploy.runtime.text.hf import HF_KIND, HfTokenizer, load_hf_tokenizer
from clipdeploy.runtime.text.openai_bpe import (
    BPE_KIND,
    BpeTokenizer,
    load_bpe_tokenizer,
)

__all__ = ["CLEAN_MODES", "SUPPORTED_KINDS", "BpeTokenizer", "HfTokenizer", "load_tokenizer"]

# Each kind and how to build it; a new tokenizer kind is one module and one entry here.
_LOADERS = {BPE_KIND: load_bpe_tokenizer, HF_KIND: load_hf_tokenizer}
SUPPORTED_KINDS = tuple(_LOADERS)


def load_tokenizer(cfg: dict, root: Path) -> Any:
    """Build the tokenizer described by a manifest's tokenizer entry; files are relative to root.

    ``openclip-bpe``: a BpeTokenizer; ``hf-tokenizers``: an HfTokenizer, or an ArtifactError saying
    how to supply the files when the export could not fetch them.
    """
    if not isinstance(cfg, dict):
        raise ArtifactError(
            f"manifest tokenizer entry is {type(cfg).__name__}, expected a mapping; "
            "re-export the artifact"
        )
    kind = cfg.get("kind")
    if kind not in SUPPORTED_KINDS:
        raise ArtifactError(
            f"manifest tokenizer kind is {kind!r}; this runtime supports "
            f"{', '.join(SUPPORTED_KINDS)}; upgrade clipdeploy or re-export the artifact"
        )
    return _LOADERS[kind](cfg, Path(root))
