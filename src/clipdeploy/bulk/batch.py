"""The per-batch function, public as ``clipdeploy.embed_batch``: drop it into your own Ray or Spark job."""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from clipdeploy.bulk.sources import Item, tar_members
from clipdeploy.errors import InputError

if TYPE_CHECKING:
    from clipdeploy.runtime.session import ClipSession


@dataclass
class BatchResult:
    """``embeddings[k]`` belongs to ``items[ok[k]]``; ``errors`` maps an unreadable item's index to the reason."""

    embeddings: np.ndarray
    ok: list[int]
    errors: dict[int, str] = field(default_factory=dict)


class TarCache:
    """Open tar files and their members, each tar opened and indexed once (close() when done)."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}

    def read(self, path: str, member: str) -> bytes:
        if path not in self._open:
            tar = tarfile.open(path)
            # Indexed as enumeration did, so a tar cut short fails only for the member the cut runs through
            # (tarfile's own lookup reads every header, and would fail for all of them).
            self._open[path] = (tar, {m.name: m for m in tar_members(tar)})
        tar, index = self._open[path]
        if member not in index:
            raise InputError(f"tar member {member!r} of {path!r} is not a file in it")
        f = tar.extractfile(index[member])
        if f is None:
            raise InputError(f"tar member {member!r} of {path!r} is not a file")
        return f.read()

    def close(self) -> None:
        for tar, _ in self._open.values():
            tar.close()
        self._open.clear()


def read_item(item: Item, tars: TarCache | None = None) -> bytes | str:
    """An item's encoded bytes (a file or tar member), or its text; ``tars`` keeps tar files open between calls."""
    loc = item.locator
    if isinstance(loc, tuple):
        if tars is not None:
            return tars.read(*loc)
        once = TarCache()
        try:
            return once.read(*loc)
        finally:
            once.close()
    return loc


def embed_batch(
    session: ClipSession, items: Sequence[Any], *, texts: bool = False, fast_decode: bool = False
) -> BatchResult:
    """Embed a batch: images (paths, bytes, PIL) or, with ``texts=True``, strings. An item that cannot be
    decoded does not fail the batch: it goes to ``errors`` with the reason. Embeddings are L2-normalized,
    exactly what ``session.encode_image`` / ``encode_text`` give for the same inputs."""
    prepared = prepare_batch(session, items, texts=texts, fast_decode=fast_decode)
    return encode_prepared(session, prepared, texts=texts)


def prepare_batch(session: ClipSession, items: Sequence[Any], *, texts: bool = False, fast_decode: bool = False) -> Any:
    """The decode half of :func:`embed_batch` (run it in a thread to overlap decoding with inference)."""
    if texts:
        return list(items)
    pixels, ok, errors = [], [], {}
    kwargs = {"fast_decode": True} if fast_decode else {}  # only when asked: older sessions lack the option
    for i, item in enumerate(items):
        try:
            pixels.append(session.preprocess([item], **kwargs)[0])
            ok.append(i)
        except Exception as e:  # a corrupt item never stops the run; PIL raises many types
            errors[i] = str(e) if isinstance(e, InputError) else f"{type(e).__name__}: {e}"
    return pixels, ok, errors


def encode_prepared(session: ClipSession, prepared: Any, *, texts: bool = False) -> BatchResult:
    """The inference half of :func:`embed_batch`."""
    if texts:
        if not prepared:
            return BatchResult(np.zeros((0, session.embed_dim), np.float32), [])
        return BatchResult(session.encode_text(prepared).astype(np.float32), list(range(len(prepared))))
    pixels, ok, errors = prepared
    if not pixels:
        return BatchResult(np.zeros((0, session.embed_dim), np.float32), [], errors)
    emb = session.encode_pixels(np.stack(pixels))
    return BatchResult(np.asarray(emb, dtype=np.float32), ok, errors)
