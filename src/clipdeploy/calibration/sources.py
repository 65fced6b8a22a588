"""Where calibration and held-out data come from: image folders, webdataset-style tar shards, caption
files, and a built-in text set (ImageNet class names times open_clip's prompt templates)."""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from clipdeploy.calibration.bundled import data_lines
from clipdeploy.errors import CalibrationError, UsageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class ImageSample:
    """One image in a folder or inside a tar shard. ``read()`` returns its raw bytes."""

    path: Path  # the file, or the tar shard that holds it
    member: str | None = None  # the member name inside a tar shard

    @property
    def label(self) -> str:
        return f"{self.path}#{self.member}" if self.member else str(self.path)

    def read(self) -> bytes:
        if self.member is None:
            return self.path.read_bytes()
        with tarfile.open(self.path) as tar:
            f = tar.extractfile(self.member)
            if f is None:
                raise OSError(f"{self.member} is not a regular file")
            return f.read()


def _tar_members(shard: Path) -> list[ImageSample]:
    try:
        with tarfile.open(shard) as tar:
            names = [m.name for m in tar.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError) as e:
        raise CalibrationError(f"cannot read tar shard {str(shard)!r} ({e}); pass a readable .tar file") from e
    return [ImageSample(shard, n) for n in sorted(names) if Path(n).suffix.lower() in IMAGE_SUFFIXES]


def list_images(paths: Sequence[str | Path]) -> list[ImageSample]:
    """Every image under ``paths``: folders recursively, tar shards member by member, or single files.

    The order is sorted, so a seed picks the same samples on every machine.
    """
    samples: list[ImageSample] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UsageError(f"calibration image source {str(path)!r} does not exist; pass a folder, a .tar shard or an image")
        if path.is_dir():
            samples += [
                ImageSample(p) for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            ]
        elif tarfile.is_tarfile(path):
            samples += _tar_members(path)
        else:
            samples.append(ImageSample(path))
    if not samples:
        joined = ", ".join(str(p) for p in paths)
        raise CalibrationError(
            f"found 0 images in {joined}; pass folders or .tar shards holding "
            f"{'/'.join(sorted(s.lstrip('.') for s in IMAGE_SUFFIXES))} files"
        )
    return samples


def read_texts(path: str | Path) -> list[str]:
    """One caption per line; blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"text file {str(p)!r} does not exist; pass a UTF-8 file with one caption per line")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise CalibrationError(f"text file {str(p)!r} is not UTF-8 ({e}); re-save it as UTF-8") from e
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise CalibrationError(f"found 0 captions in {str(p)!r}; it needs one caption per line")
    return texts


def imagenet_classes() -> list[str]:
    return data_lines("imagenet_classes.txt")


def imagenet_prompts() -> list[str]:
    """The default prompt set of the top-1 gate: one "a photo of a {}." per ImageNet class."""
    return [f"a photo of a {c}." for c in imagenet_classes()]


def builtin_texts() -> list[str]:
    """ImageNet class names times open_clip's 80 templates: 80,000 real, varied captions."""
    templates = data_lines("imagenet_templates.txt")
    return [t.replace("{}", c) for c in imagenet_classes() for t in templates]
