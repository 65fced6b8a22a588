"""A torch-free reproduction of open_clip's ``SimpleTokenizer`` (CLIP byte-level BPE).

Token ids are identical to open_clip's for the same vocab file, clean mode, special tokens and
context length; ``tests/runtime/test_tokenizer.py`` checks this against open_clip itself.
Only the stdlib, numpy, ftfy and regex are used; ftfy and regex are imported on first use.
"""

from __future__ import annotations

import functools
import gzip
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy.errors import ArtifactError, InputError, UsageError
from clipdeploy.runtime.text.common import (
    CLEAN_FNS,
    CLEAN_MODES,
    DEFAULT_CONTEXT_LENGTH,
    as_text_list,
    check_context_length,
    import_package,
    resolve_file,
)

__all__ = ["BPE_KIND", "BpeTokenizer", "load_bpe_tokenizer"]

BPE_KIND = "openclip-bpe"
# open_clip keeps every BPE result forever; a server tokenizing arbitrary text must not.
_BPE_CACHE_SIZE = 1 << 16
_DEFAULT_SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character (the reversible GPT-2/CLIP table)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(word[i], word[i + 1]) for i in range(len(word) - 1)}

def _read_merges(bpe_path: Path) -> list[tuple[str, ...]]:
    try:
        with gzip.open(bpe_path) as f:
            lines = f.read().decode("utf-8").split("\n")
    except FileNotFoundError as exc:
        raise ArtifactError(
            f"BPE vocab file {str(bpe_path)!r} does not exist; expected a gzipped CLIP merges file "
            "(bpe_simple_vocab_16e6.txt.gz); check the path or re-export the artifact"
        ) from exc
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise ArtifactError(
            f"BPE vocab file {str(bpe_path)!r} is unreadable ({type(exc).__name__}: {exc}); "
            "expected a gzipped UTF-8 CLIP merges file; re-export the artifact"
        ) from exc
    # Same slice as open_clip: skip the header line, keep 49152 - 256 - 2 merges.
    return [tuple(merge.split()) for merge in lines[1 : 49152 - 256 - 2 + 1]]


class BpeTokenizer:
    """CLIP byte-level BPE tokenizer, token-for-token equal to open_clip's SimpleTokenizer."""

    def __init__(
        self,
        bpe_path: str | Path,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        clean: str = "lower",
        additional_special_tokens: list[str] | None = None,
    ) -> None:
        if clean not in CLEAN_FNS:
            raise UsageError(
                f"unknown clean mode {clean!r}; expected one of {', '.join(CLEAN_MODES)}"
            )
        check_context_length(context_length, "context_length", UsageError)
        regex = import_package("regex")

        self.bpe_path = Path(bpe_path)
        self.clean = clean
        self.context_length = context_length
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}

        merges = _read_merges(self.bpe_path)
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab.extend("".join(merge) for merge in merges)
        special_tokens = list(_DEFAULT_SPECIAL_TOKENS)
        if additional_special_tokens:
            special_tokens += list(additional_special_tokens)
        vocab.extend(special_tokens)

        self.special_tokens = special_tokens
        self.additional_special_tokens = special_tokens[2:]
        self.encoder: dict[str, int] = dict(zip(vocab, range(len(vocab))))
        self.decoder: dict[int, str] = {v: k for k, v in self.encoder.items()}
        self.bpe_ranks: dict[tuple[str, ...], int] = dict(zip(merges, range(len(merges))))
        # open_clip seeds its BPE cache with the special tokens, so they are never split.
        self._special_bpe = {t: t for t in special_tokens}
        self._bpe_cached = self._new_bpe_cache()

        # The special tokens go into the pattern unescaped, exactly as open_clip does it.
        special = "|".join(special_tokens)
        try:
            self.pat = regex.compile(
                special + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                regex.IGNORECASE,
            )
        except regex.error as exc:
            raise UsageError(
                f"additional_special_tokens {self.additional_special_tokens!r} do not form a valid "
                f"regular expression ({exc}); open_clip inserts them unescaped, so remove regex "
                "metacharacters"
            ) from exc
        self._clean_fn = CLEAN_FNS[clean]

        self.vocab_size = len(self.encoder)
        self.all_special_ids = [self.encoder[t] for t in special_tokens]
        self.sot_token_id = self.all_special_ids[0]
        self.eot_token_id = self.all_special_ids[1]

    def _new_bpe_cache(self) -> Any:
        return functools.lru_cache(maxsize=_BPE_CACHE_SIZE)(self._bpe_uncached)

    # The per-instance cache wraps a bound method and cannot be pickled; rebuild it instead, so the
    # tokenizer can be sent to worker processes.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_bpe_cached"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._bpe_cached = self._new_bpe_cache()

    def bpe(self, token: str) -> str:
        """Split one byte-encoded pre-token into space-separated BPE symbols."""
        special = self._special_bpe.get(token)
        if special is not None:
            return special
        return self._bpe_cached(token)

    def _bpe_uncached(self, token: str) -> str:
        word: tuple[str, ...] = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _get_pairs(word)
        if not pairs:
            return token + "</w>"

        ranks = self.bpe_ranks
        inf = float("inf")
        while True:
            bigram = min(pairs, key=lambda pair: ranks.get(pair, inf))
            if bigram not in ranks:
                break
            first, second = bigram
            new_word: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = _get_pairs(word)
        return " ".join(word)

    def encode(self, text: str) -> list[int]:
        """Token ids for one text, without start/end tokens or truncation."""
        if not isinstance(text, str):
            raise InputError(
                f"got {type(text).__name__}, expected str; pass the text as a Python string"
            )
        ids: list[int] = []
        text = self._clean_fn(text)
        for token in self.pat.findall(text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text for token ids; '</w>' becomes a space, invalid UTF-8 becomes U+FFFD."""
        pieces = []
        for i in ids:
            try:
                pieces.append(self.decoder[int(i)])
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(
                    f"token id {i!r} is not in the vocabulary; expected an int in "
                    f"[0, {self.vocab_size}); pass ids produced by this tokenizer"
                ) from exc
        text = "".join(pieces)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None
    ) -> np.ndarray:
        """Token ids as an int64 array [N, context_length]: SOT, text, EOT, zero padding.

        Texts longer than the context are truncated and their last token replaced by EOT.
        """
        texts = as_text_list(texts)
        # `or`, like open_clip: 0 and None both mean the tokenizer's own context length.
        context_length = context_length or self.context_length
        check_context_length(context_length, "context_length", InputError)

        result = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(tokens) > context_length:
                tokens = tokens[:context_length]
                tokens[-1] = self.eot_token_id
            result[row, : len(tokens)] = tokens
        return result

    def truncated(self, texts: str | Sequence[str], context_length: int | None = None) -> list[int]:
        """Indices of the texts that ``__call__`` cuts: SOT, text and EOT take more than the context length."""
        length = context_length or self.context_length
        return [i for i, text in enumerate(as_text_list(texts)) if len(self.encode(text)) + 2 > length]

    def __repr__(self) -> str:
        return (
            f"BpeTokenizer(bpe_path={str(self.bpe_path)!r}, context_length={self.context_length}, "
            f"clean={self.clean!r}, additional_special_tokens={self.additional_special_tokens!r})"
        )


def load_bpe_tokenizer(cfg: dict, root: Path) -> BpeTokenizer:
    """Build the BpeTokenizer a manifest tokenizer entry describes, checked against its special ids."""
    reduction = cfg.get("reduction_mask")
    if reduction:
        raise ArtifactError(
            f"manifest tokenizer asks for reduction_mask {reduction!r}, a training-time token "
            "dropping strategy not supported at inference; export with a tokenizer without "
            "reduction_mask"
        )

    root = Path(root)
    bpe_path = resolve_file(cfg, "bpe_vocab", root)
    context_length = cfg.get("context_length", DEFAULT_CONTEXT_LENGTH)
    clean = cfg.get("clean", "lower")
    extra = cfg.get("additional_special_tokens")
    if extra is not None and (
        not isinstance(extra, list) or not all(isinstance(t, str) for t in extra)
    ):
        raise ArtifactError(
            f"manifest tokenizer additional_special_tokens is {extra!r}; expected null or a list "
            "of strings; re-export the artifact"
        )
    if not bpe_path.is_file():
        raise ArtifactError(
            f"tokenizer vocab file {str(bpe_path)!r} is missing; expected it in the artifact "
            "directory; copy the whole artifact directory or re-export it"
        )
    try:
        tokenizer = BpeTokenizer(
            bpe_path,
            context_length=context_length,
            clean=clean,
            additional_special_tokens=extra,
        )
    except UsageError as exc:
        raise ArtifactError(f"manifest tokenizer entry is invalid: {exc}") from exc

    for key, built in (
        ("sot_token_id", tokenizer.sot_token_id),
        ("eot_token_id", tokenizer.eot_token_id),
    ):
        expected = cfg.get(key)
        if expected != built:
            raise ArtifactError(
                f"tokenizer built from {str(bpe_path)!r} has {key} {built}, but the manifest "
                f"says {expected!r}; the vocab file is probably the wrong one; "
                "re-export the artifact"
            )
    return tokenizer
