"""What both tokenizers share: open_clip's text cleaning, the input checks, and manifest file paths.

Only the stdlib and numpy at import time; ftfy is imported on first use.
"""

from __future__ import annotations

import html
import string
from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy.errors import ArtifactError, DependencyError, InputError

DEFAULT_CONTEXT_LENGTH = 77
CLEAN_MODES = ("lower", "whitespace", "canonicalize")
# Same table as open_clip's canonicalize_text default argument (ASCII punctuation only).
_TRANS_PUNCTUATION = str.maketrans("", "", string.punctuation)


def import_package(name: str) -> Any:
    """A base dependency of the tokenizers (ftfy, regex, tokenizers), imported on first use."""
    try:
        return __import__(name)
    except ImportError as exc:
        raise DependencyError(
            f"the tokenizer needs the package {name!r}, which is not installed; "
            f"reinstall clipdeploy (it is a base dependency) or `pip install {name}`"
        ) from exc


def basic_clean(text: str) -> str:
    """Fix mojibake with ftfy, unescape HTML entities twice, strip."""
    ftfy = import_package("ftfy")
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    """Collapse every run of (unicode) whitespace to one space."""
    return " ".join(text.split()).strip()


def canonicalize_text(text: str) -> str:
    """open_clip's canonicalize_text with keep_punctuation_exact_string=None."""
    text = text.replace("_", " ")
    text = text.translate(_TRANS_PUNCTUATION)
    text = text.lower()
    text = " ".join(text.split())
    return text.strip()


def _clean_lower(text: str) -> str:
    return whitespace_clean(basic_clean(text)).lower()


def _clean_whitespace(text: str) -> str:
    return whitespace_clean(basic_clean(text))


def _clean_canonicalize(text: str) -> str:
    return canonicalize_text(basic_clean(text))


CLEAN_FNS = {
    "lower": _clean_lower,
    "whitespace": _clean_whitespace,
    "canonicalize": _clean_canonicalize,
}


def check_context_length(value: Any, name: str, error: type[Exception]) -> None:
    """Refuse a context length that is not a positive int, with the error class of the caller's layer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise error(f"{name} is {value!r}; expected a positive int such as 77")


def as_text_list(texts: Any) -> list[str]:
    """One str or a sequence of str, as a list; anything else is an InputError naming the bad item."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)):
        raise InputError(
            f"texts is {type(texts).__name__}, expected str or a sequence of str; decode it first"
        )
    try:
        texts = list(texts)
    except TypeError:
        raise InputError(
            f"texts is {type(texts).__name__}, expected str or a sequence of str"
        ) from None
    if not texts:
        raise InputError("no texts given: pass at least one string")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(
                f"texts[{i}] is {type(text).__name__}, expected str; convert every item to a string"
            )
    return texts


def resolve_file(cfg: dict, key: str, root: Path) -> Path:
    """The path of the tokenizer file ``files[key]`` of a manifest entry, refused if it leaves the artifact."""
    files = cfg.get("files")
    rel = files.get(key) if isinstance(files, dict) else None
    if not isinstance(rel, str) or not rel:
        raise ArtifactError(
            f"manifest tokenizer files.{key} is {rel!r}; expected a path relative to the artifact "
            "directory; re-export the artifact"
        )
    path = root / rel
    # Manifest paths must stay inside the artifact directory.
    if Path(rel).is_absolute() or not path.resolve().is_relative_to(root.resolve()):
        raise ArtifactError(
            f"manifest tokenizer files.{key} is {rel!r}; expected a path inside the artifact "
            "directory; re-export the artifact"
        )
    return path
