"""Calibration and held-out sets, made through the artifact's own preprocessing and tokenizer.

The two sets are disjoint by construction: one seeded shuffle, held-out first, calibration after.
Unreadable files are skipped, counted and reported; too few usable samples is an error. Random data
is never substituted for real data.

When the data cannot fill both sets as asked (``split``), it is shared evenly: each set is capped
at what was asked, and what one does not take goes to the other; calibration never gets fewer than
``min_calibration`` and the held-out set never fewer than ``MIN_HELD_OUT``. Each held-out sample
keeps its identity (file, ``shard#member`` or caption) so the gate can name its worst samples.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipdeploy import progress
from clipdeploy.calibration.sources import ImageSample
from clipdeploy.errors import CalibrationError, InputError
from clipdeploy.runtime.preprocess import load_image

log = logging.getLogger(__name__)

MIN_HELD_OUT = 32  # fewest held-out samples per tower a gate may judge on; below this a min or p1 means little


@dataclass
class SampleSet:
    """Model inputs for one tower, split into calibration and held-out parts."""

    calibration: np.ndarray
    held_out: np.ndarray
    found: int  # candidates in the sources
    used: int  # samples actually read into the two sets
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason) of unreadable samples
    fingerprint: str = ""  # sha256 over the calibration samples' content, for the calibration cache
    held_out_ids: list[str] = field(default_factory=list)  # file, shard#member or caption of each held-out row
    asked: tuple[int, int] = (0, 0)  # (calibration, held_out) as asked, before ``split`` shared short data

    def report(self) -> dict[str, Any]:
        return {
            "found": self.found,
            "calibration": int(len(self.calibration)),
            "held_out": int(len(self.held_out)),
            "asked": {"calibration": self.asked[0], "held_out": self.asked[1]},
            "skipped": len(self.skipped),
            "skipped_examples": [f"{s}: {r}" for s, r in self.skipped[:5]],
            "fingerprint": self.fingerprint,
        }


def _progress(total: int, desc: str) -> Any:
    return progress.counter(total, desc, unit="img")  # drawn only on a terminal, and not with --quiet


def _read_all(samples: Sequence[ImageSample]) -> Iterator[tuple[ImageSample, bytes | Exception]]:
    """Read each sample once; every tar shard is opened once, not once per member."""
    by_shard: dict[Any, list[ImageSample]] = {}
    for s in samples:
        by_shard.setdefault(s.path if s.member else None, []).append(s)
    for shard, group in by_shard.items():
        if shard is None:
            for s in group:
                try:
                    yield s, s.read()
                except OSError as e:
                    yield s, e
            continue
        try:
            with tarfile.open(shard) as tar:
                for s in group:
                    try:
                        f = tar.extractfile(s.member)  # type: ignore[arg-type]
                        yield s, f.read() if f is not None else OSError("not a regular file")
                    except (KeyError, OSError, tarfile.TarError) as e:
                        yield s, e
        except (OSError, tarfile.TarError) as e:
            for s in group:
                yield s, e


def _need(min_calibration: int) -> str:
    return (f"need at least {MIN_HELD_OUT + min_calibration} ({MIN_HELD_OUT} held out for the accuracy gate, "
            f"the fewest it accepts, + {min_calibration} to calibrate, --min-samples)")


def _split_sizes(n_found: int, calibration: int, held_out: int, min_calibration: int, kind: str) -> None:
    if n_found < MIN_HELD_OUT + min_calibration:
        # --min-samples 1 is the lowest accepted: then more data is the only way out.
        lower = f", or lower --min-samples (now {min_calibration})" if min_calibration > 1 else ""
        raise CalibrationError(f"found {n_found} usable {kind}, {_need(min_calibration)}; pass more data{lower}")


def split(usable: int, calibration: int, held_out: int, min_calibration: int) -> tuple[int, int]:
    """(calibration, held-out) sizes for ``usable`` samples, asked ``calibration`` and ``held_out``.

    Enough data: both as asked. Short data: shared evenly, each capped at what was asked, the rest to
    the other set, with calibration >= ``min_calibration`` and held-out >= ``MIN_HELD_OUT``. (Even,
    because a gate on a few dozen samples cannot see a rare bad image, and min-max ranges from 150
    calibration samples differ little from those of 300.)"""
    if usable >= calibration + held_out:
        return calibration, held_out
    cal = min(calibration, max(min_calibration, usable - held_out, usable - usable // 2), usable - MIN_HELD_OUT)
    return cal, min(held_out, usable - cal)


def image_set(
    samples: Sequence[ImageSample],
    preprocess: Callable[[list[Any]], np.ndarray],
    *,
    calibration: int,
    held_out: int,
    seed: int,
    min_calibration: int,
) -> SampleSet:
    """Shuffle with ``seed``, read until both sets are full, skipping what cannot be decoded."""
    _split_sizes(len(samples), calibration, held_out, min_calibration, "images")
    order = np.random.default_rng(seed).permutation(len(samples))
    wanted = held_out + calibration
    # Read a little more than needed in one pass, so a few unreadable files do not cost a second pass.
    picked = [samples[i] for i in order[: min(len(samples), wanted + max(8, wanted // 10))]]
    rest = [samples[i] for i in order[len(picked) :]]
    pixels: list[np.ndarray] = []
    digests: list[str] = []
    labels: list[str] = []
    skipped: list[tuple[str, str]] = []
    bar = _progress(wanted, "reading calibration images")
    for batch in (picked, rest):
        for sample, data in _read_all(batch):
            if len(pixels) >= wanted:
                break
            if isinstance(data, Exception):
                skipped.append((sample.label, f"{type(data).__name__}: {data}"))
                continue
            try:
                pixels.append(preprocess([load_image(data, label=sample.label)])[0])
            except InputError as e:
                skipped.append((sample.label, str(e)))
                continue
            digests.append(hashlib.sha256(data).hexdigest())
            labels.append(sample.label)
            if bar is not None:
                bar.update(1)
        if len(pixels) >= wanted:
            break
    if bar is not None:
        bar.close()
    if skipped:
        log.warning("skipped %d unreadable images, e.g. %s", len(skipped), skipped[0][0])
    usable = len(pixels)
    if usable < MIN_HELD_OUT + min_calibration:
        raise CalibrationError(
            f"found {usable} usable images of {len(samples)} ({len(skipped)} unreadable), "
            f"{_need(min_calibration)}; pass more data"
        )
    n_cal, n_held = split(usable, calibration, held_out, min_calibration)
    if (n_cal, n_held) != (calibration, held_out):
        log.warning("%d usable images: %d to calibrate and %d held out (asked %d and %d)",
                    usable, n_cal, n_held, calibration, held_out)
    stack = np.stack(pixels[: n_held + n_cal]).astype(np.float32, copy=False)
    fingerprint = hashlib.sha256("\n".join(digests[n_held : n_held + n_cal]).encode()).hexdigest()
    return SampleSet(stack[n_held:], stack[:n_held], len(samples), n_held + n_cal, skipped, fingerprint,
                     labels[:n_held], (calibration, held_out))


def text_set(
    texts: Sequence[str],
    tokenize: Callable[[list[str]], np.ndarray],
    *,
    calibration: int,
    held_out: int,
    seed: int,
    min_calibration: int,
) -> SampleSet:
    unique = list(dict.fromkeys(texts))  # duplicates would leak held-out captions into calibration
    _split_sizes(len(unique), calibration, held_out, min_calibration, "captions")
    order = np.random.default_rng(seed).permutation(len(unique))[: held_out + calibration]
    n_cal, n_held = split(len(order), calibration, held_out, min_calibration)
    chosen = [unique[i] for i in order[: n_held + n_cal]]
    ids = tokenize(chosen)
    fingerprint = hashlib.sha256("\n".join(chosen[n_held:]).encode()).hexdigest()
    return SampleSet(ids[n_held:], ids[:n_held], len(texts), len(chosen), [], fingerprint, chosen[:n_held],
                     (calibration, held_out))
