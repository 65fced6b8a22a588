"""Copy an open_clip tokenizer's files into an artifact and describe it for the manifest.

The description is what ``clipdeploy.runtime.text.load_tokenizer`` reads back.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

from clipdeploy.errors import DependencyError, ExportError
from clipdeploy.runtime.text import BpeTokenizer
from clipdeploy.runtime.text.hf import HF_KIND
from clipdeploy.runtime.text.openai_bpe import BPE_KIND

__all__ = ["describe_tokenizer"]

TOKENIZER_DIR = "tokenizer"


def describe_tokenizer(
    tokenizer: Any, artifact_dir: Path, *, missing: dict[str, Any] | None = None, context_length: int | None = None
) -> dict:
    """Copy the tokenizer's files into ``artifact_dir/tokenizer/`` and return its manifest entry.

    open_clip's ``SimpleTokenizer`` (CLIP BPE) becomes kind ``openclip-bpe``; its ``HFTokenizer`` and
    ``SigLipTokenizer`` become ``hf-tokenizers``. ``tokenizer=None`` with ``missing`` set records a
    Hugging Face tokenizer that could not be fetched. Anything else raises ExportError.
    """
    try:
        from open_clip import tokenizer as oc_tok
    except ImportError as exc:
        raise DependencyError(
            "exporting a tokenizer needs open_clip, which is not installed; "
            "install it with `pip install 'clipdeploy[export]'`"
        ) from exc

    if tokenizer is None:
        if not missing:
            raise ExportError("no tokenizer and no reason recorded; pass the model's tokenizer")
        return {
            "kind": HF_KIND,
            "context_length": context_length,
            "hf_tokenizer_name": missing.get("hf_tokenizer_name"),
            "missing": missing,
            "files": {},
        }
    name = type(tokenizer).__name__
    # Exact types, not isinstance: a subclass may override __call__ and silently break parity.
    if type(tokenizer) in (oc_tok.HFTokenizer, oc_tok.SigLipTokenizer):
        return _describe_hf(tokenizer, Path(artifact_dir), oc_tok)
    if type(tokenizer) is not oc_tok.SimpleTokenizer:
        raise ExportError(
            f"tokenizer kind {name} is not supported by the exporter; expected open_clip's SimpleTokenizer "
            "(CLIP BPE), HFTokenizer or SigLipTokenizer"
        )

    context_length = tokenizer.context_length
    if type(context_length) is not int or context_length < 1:
        raise ExportError(
            f"tokenizer context_length is {context_length!r}; expected a positive int; "
            "pass context_length to open_clip.get_tokenizer"
        )
    clean = _clean_mode(tokenizer.clean_fn, oc_tok)
    reduction = _reduction_mask(tokenizer.reduction_fn, oc_tok)

    special_ids = list(tokenizer.all_special_ids)
    additional = [tokenizer.decoder[i] for i in special_ids[2:]]

    # SimpleTokenizer does not keep its bpe_path; use the attribute if a version ever adds one.
    src = Path(getattr(tokenizer, "bpe_path", None) or oc_tok.default_bpe())
    if not src.is_file():
        raise ExportError(
            f"tokenizer vocab file {str(src)!r} does not exist; expected open_clip's "
            "bpe_simple_vocab_16e6.txt.gz; reinstall open_clip_torch"
        )
    artifact_dir = Path(artifact_dir)
    dest_dir = artifact_dir / TOKENIZER_DIR
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / src.name
    shutil.copyfile(src, dest)

    entry: dict[str, Any] = {
        "kind": BPE_KIND,
        "context_length": context_length,
        "clean": clean,
        "additional_special_tokens": additional or None,
        "files": {"bpe_vocab": dest.relative_to(artifact_dir).as_posix()},
        "sot_token_id": int(tokenizer.sot_token_id),
        "eot_token_id": int(tokenizer.eot_token_id),
    }
    if reduction is not None:
        # Recorded so the runtime can refuse it with a clear message instead of tokenizing wrongly.
        entry["reduction_mask"] = reduction

    _check_same_vocab(tokenizer, dest, entry, src)
    return entry


def _clean_mode(clean_fn: Any, oc_tok: Any) -> str:
    fn = clean_fn
    if isinstance(fn, functools.partial):
        if fn.args or fn.keywords:
            raise ExportError(
                f"tokenizer clean_fn is {fn!r}, a partial with arguments; expected one of "
                "open_clip's clean modes lower, whitespace or canonicalize without options"
            )
        fn = fn.func
    modes = {
        getattr(oc_tok, "_clean_lower", None): "lower",
        getattr(oc_tok, "_clean_whitespace", None): "whitespace",
        getattr(oc_tok, "_clean_canonicalize", None): "canonicalize",
    }
    modes.pop(None, None)
    mode = modes.get(fn)
    if mode is None:
        raise ExportError(
            f"tokenizer clean_fn is {clean_fn!r}; expected one of open_clip's clean modes "
            "lower, whitespace or canonicalize; build the tokenizer with clean=<one of those>"
        )
    return mode


def _reduction_mask(reduction_fn: Any, oc_tok: Any) -> str | None:
    if reduction_fn is None:
        return None
    fn, keywords = reduction_fn, {}
    if isinstance(fn, functools.partial):
        fn, keywords = fn.func, fn.keywords
    if fn is getattr(oc_tok, "random_mask_tokenize", None):
        return "shuffle" if keywords.get("shuffle") else "random"
    if fn is getattr(oc_tok, "simple_mask_tokenize", None):
        return "simple"
    if fn is getattr(oc_tok, "syntax_mask_tokenize", None):
        return "syntax"
    return getattr(fn, "__name__", type(fn).__name__)


def _check_same_vocab(tokenizer: Any, dest: Path, entry: dict, src: Path) -> None:
    """Rebuild with the runtime tokenizer and compare: catches a custom bpe_path we cannot see."""
    rebuilt = BpeTokenizer(
        dest,
        context_length=entry["context_length"],
        clean=entry["clean"],
        additional_special_tokens=entry["additional_special_tokens"],
    )
    if rebuilt.encoder != tokenizer.encoder or rebuilt.bpe_ranks != tokenizer.bpe_ranks:
        dest.unlink(missing_ok=True)
        raise ExportError(
            f"the tokenizer's vocab differs from {str(src)!r}, open_clip's default BPE file; "
            "expected a SimpleTokenizer built from the default vocab (a custom bpe_path cannot "
            "be detected); build it with the default bpe_path"
        )


def _describe_hf(tokenizer: Any, artifact_dir: Path, oc_tok: Any) -> dict[str, Any]:
    """Save the fast tokenizer's own ``tokenizers.Tokenizer`` and the settings transformers adds to it."""
    name = type(tokenizer).__name__
    if getattr(tokenizer, "tokenizer_mode", ""):
        raise ExportError(
            f"{name} tokenizer_mode {tokenizer.tokenizer_mode!r} is not supported; expected the standard mode "
            "(no tokenizer_mode in the model config)"
        )
    hf = tokenizer.tokenizer
    backend = getattr(hf, "backend_tokenizer", None) or getattr(hf, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise ExportError(
            f"the Hugging Face tokenizer {type(hf).__name__} has no fast (tokenizers) backend; expected a "
            "tokenizer folder with tokenizer.json (save it with a fast tokenizer)"
        )
    if type(tokenizer) is oc_tok.SigLipTokenizer:
        clean, strip_sep = "canonicalize", False
    else:
        clean, strip_sep = _clean_mode(tokenizer.clean_fn, oc_tok), bool(tokenizer.strip_sep_token)
    context_length = tokenizer.context_length
    if type(context_length) is not int or context_length < 1:
        raise ExportError(f"tokenizer context_length is {context_length!r}; expected a positive int")
    pad_id = hf.pad_token_id
    if pad_id is None:
        raise ExportError(
            f"the Hugging Face tokenizer {type(hf).__name__} has no pad token, but open_clip pads to "
            "max_length; give the tokenizer a pad token"
        )
    dest_dir = artifact_dir / TOKENIZER_DIR
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / "tokenizer.json"
    # The backend as transformers configured it; padding/truncation are set per call at runtime.
    saved = backend.__class__.from_str(backend.to_str())
    saved.no_padding()
    saved.no_truncation()
    dest.write_text(saved.to_str(), encoding="utf-8")
    return {
        "kind": HF_KIND,
        "context_length": context_length,
        "clean": clean,
        "files": {"tokenizer_json": dest.relative_to(artifact_dir).as_posix()},
        "hf_tokenizer_class": type(hf).__name__,
        "hf_tokenizer_name": str(getattr(hf, "name_or_path", "") or ""),
        "pad_token_id": int(pad_id),
        "pad_token": str(hf.pad_token) if hf.pad_token is not None else None,
        "padding_side": str(getattr(hf, "padding_side", "right")),
        "truncation_side": str(getattr(hf, "truncation_side", "right")),
        "strip_sep_token": strip_sep,
        "sep_token_id": int(hf.sep_token_id) if strip_sep else None,
    }
