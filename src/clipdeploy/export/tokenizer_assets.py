"""Copy an open_clip tokenizer's files into an artifact and describe it for the manifest.

The description is what ``clipdeploy.runtime.tokenizer.load_tokenizer`` reads back.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

from clipdeploy.errors import DependencyError, ExportError

__all__ = ["describe_tokenizer"]

TOKENIZER_DIR = "tokenizer"


def describe_tokenizer(tokenizer: Any, artifact_dir: Path) -> dict:
    """Copy the tokenizer's vocab into ``artifact_dir/tokenizer/`` and return its manifest entry.

    Only open_clip's ``SimpleTokenizer`` (CLIP BPE) is supported; anything else raises ExportError.
    """
    try:
        from open_clip import tokenizer as oc_tok
    except ImportError as exc:
        raise DependencyError(
            "exporting a tokenizer needs open_clip, which is not installed; "
            "install it with `pip install 'clipdeploy[export]'`"
        ) from exc

    name = type(tokenizer).__name__
    # Exact type, not isinstance: a subclass may override encode() and silently break parity.
    if type(tokenizer) is not oc_tok.SimpleTokenizer:
        raise ExportError(
            f"tokenizer kind {name} is not supported yet by the exporter; only open_clip's "
            "SimpleTokenizer (CLIP BPE) is; support for Hugging Face tokenizers is planned"
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
        "kind": "openclip-bpe",
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
    from clipdeploy.runtime.tokenizer import BpeTokenizer

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
