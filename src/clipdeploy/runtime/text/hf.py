"""A torch-free reproduction of open_clip's ``HFTokenizer`` and ``SigLipTokenizer``.

open_clip cleans each text in Python (its ``clean`` modes: lower, whitespace, canonicalize), then
calls a Hugging Face fast tokenizer with ``max_length=context_length, padding="max_length",
truncation=True``, and for CLIPA replaces the SEP id with 0 (``strip_sep_token``). A fast tokenizer
is a ``tokenizers.Tokenizer`` plus a few settings kept by transformers (pad token, padding and
truncation sides). The exporter saves that very ``tokenizers.Tokenizer`` as ``tokenizer.json`` and
records the settings; this module replays the same steps with the ``tokenizers`` package only.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy.errors import ArtifactError, DependencyError, InputError
from clipdeploy.runtime.text.common import (
    CLEAN_FNS,
    CLEAN_MODES,
    as_text_list,
    check_context_length,
    import_package,
    resolve_file,
)

__all__ = ["HF_KIND", "HfTokenizer", "load_hf_tokenizer"]

HF_KIND = "hf-tokenizers"
SIDES = ("right", "left")


class HfTokenizer:
    """Token ids equal to open_clip's HFTokenizer for the same tokenizer.json and settings."""

    def __init__(
        self,
        tokenizer_json: str | Path,
        *,
        context_length: int,
        clean: str = "whitespace",
        pad_token_id: int = 0,
        pad_token: str | None = None,
        padding_side: str = "right",
        truncation_side: str = "right",
        strip_sep_token: bool = False,
        sep_token_id: int | None = None,
    ) -> None:
        if clean not in CLEAN_FNS:
            raise ArtifactError(f"unknown clean mode {clean!r}; expected one of {', '.join(CLEAN_MODES)}")
        if padding_side not in SIDES or truncation_side not in SIDES:
            raise ArtifactError(
                f"padding_side {padding_side!r} / truncation_side {truncation_side!r} must be 'right' or 'left'; "
                "re-export the artifact"
            )
        if strip_sep_token and sep_token_id is None:
            raise ArtifactError("strip_sep_token is set without a sep_token_id; re-export the artifact")
        check_context_length(context_length, "context_length", ArtifactError)
        self.path = Path(tokenizer_json)
        try:
            self._json = self.path.read_text(encoding="utf-8")
            self._plain = import_package("tokenizers").Tokenizer.from_str(self._json)  # no padding, no truncation
        except FileNotFoundError as exc:
            raise ArtifactError(
                f"tokenizer file {str(self.path)!r} is missing; copy the whole artifact directory or re-export it"
            ) from exc
        except (OSError, UnicodeDecodeError, Exception) as exc:  # tokenizers raises plain Exception
            if isinstance(exc, DependencyError):
                raise
            raise ArtifactError(
                f"tokenizer file {str(self.path)!r} is unreadable ({type(exc).__name__}: {exc}); re-export the artifact"
            ) from exc
        self.context_length = int(context_length)
        self.clean = clean
        self._clean_fn = CLEAN_FNS[clean]
        self.pad_token_id = int(pad_token_id)
        self.pad_token = pad_token
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.strip_sep_token = bool(strip_sep_token)
        self.sep_token_id = sep_token_id
        self._backends: dict[int, Any] = {}
        self._lock = threading.Lock()

    # Backends and the lock cannot be pickled; rebuild them, so the tokenizer can go to worker processes.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_plain", "_backends", "_lock"):
            del state[key]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._plain = import_package("tokenizers").Tokenizer.from_str(self._json)
        self._backends = {}
        self._lock = threading.Lock()

    def _backend(self, length: int) -> Any:
        """A tokenizers.Tokenizer set to truncate and pad to ``length``, as transformers sets it per call."""
        with self._lock:
            backend = self._backends.get(length)
            if backend is None:
                backend = import_package("tokenizers").Tokenizer.from_str(self._json)
                backend.enable_truncation(length, stride=0, strategy="longest_first", direction=self.truncation_side)
                pad: dict[str, Any] = {"length": length, "direction": self.padding_side, "pad_id": self.pad_token_id}
                if self.pad_token is not None:
                    pad["pad_token"] = self.pad_token
                backend.enable_padding(**pad)
                self._backends[length] = backend
            return backend

    def encode(self, text: str) -> list[int]:
        """Token ids of one cleaned text, with the tokenizer's special tokens, without truncation or padding."""
        if not isinstance(text, str):
            raise InputError(f"got {type(text).__name__}, expected str; pass the text as a Python string")
        return list(self._plain.encode(self._clean_fn(text)).ids)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """Token ids as an int64 array [N, context_length], padded and truncated as open_clip does."""
        texts = as_text_list(texts)
        length = context_length or self.context_length
        check_context_length(length, "context_length", InputError)
        cleaned = [self._clean_fn(t) for t in texts]
        encodings = self._backend(int(length)).encode_batch(cleaned, add_special_tokens=True)
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), int(length))
        if self.strip_sep_token:
            ids[ids == self.sep_token_id] = 0
        return ids

    def truncated(self, texts: str | Sequence[str], context_length: int | None = None) -> list[int]:
        """Indices of the texts that ``__call__`` cuts: their ids, special tokens included, exceed the length."""
        length = context_length or self.context_length
        return [i for i, text in enumerate(as_text_list(texts)) if len(self.encode(text)) > length]

    def __repr__(self) -> str:
        return (
            f"HfTokenizer({str(self.path)!r}, context_length={self.context_length}, clean={self.clean!r}, "
            f"pad_token_id={self.pad_token_id}, strip_sep_token={self.strip_sep_token})"
        )


def load_hf_tokenizer(cfg: dict, root: Path) -> HfTokenizer:
    """Build the HfTokenizer a manifest tokenizer entry describes."""
    missing = cfg.get("missing")
    if missing:
        name = missing.get("hf_tokenizer_name", "?") if isinstance(missing, dict) else "?"
        fix = missing.get("fix") if isinstance(missing, dict) else None
        raise ArtifactError(
            f"this artifact has no tokenizer: the {name} tokenizer files could not be fetched at export; "
            f"{fix or 're-export with --tokenizer-dir DIR holding them'}; encode_tokens works with your own ids"
        )
    path = resolve_file(cfg, "tokenizer_json", root)
    try:
        return HfTokenizer(
            path,
            context_length=cfg.get("context_length"),
            clean=cfg.get("clean", "whitespace"),
            pad_token_id=cfg.get("pad_token_id", 0),
            pad_token=cfg.get("pad_token"),
            padding_side=cfg.get("padding_side", "right"),
            truncation_side=cfg.get("truncation_side", "right"),
            strip_sep_token=bool(cfg.get("strip_sep_token", False)),
            sep_token_id=cfg.get("sep_token_id"),
        )
    except TypeError as exc:
        raise ArtifactError(f"manifest tokenizer entry is invalid ({exc}); re-export the artifact") from exc
