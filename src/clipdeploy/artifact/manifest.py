"""The artifact schema: ``manifest.json``, its checks, and atomic writes.

The runtime reads only the manifest and the files it lists. Every stage adds to it and records what
it did. Writes go to a temporary name first, then are renamed, so a failed stage leaves nothing
behind that could pass for a valid file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipdeploy.errors import ArtifactError, unreadable
from clipdeploy.artifact.schema import (  # the vocabulary lives with the schema; re-exported here
    FORMATS,  # noqa: F401
    MANIFEST_NAME,
    TOWERS,  # noqa: F401
    SchemaError,
    check_paths,
    check_schema,
    resolve_member,
)
from clipdeploy.artifact.staging import artifact_lock, lock_new_file, output_temporaries, reserved

# MAJOR.MINOR. A reader refuses a newer major version; minor versions only add fields.
SCHEMA_VERSION = "1.0"

_REQUIRED_KEYS = ("schema_version", "model", "towers", "preprocess", "tokenizer", "variants")
_VARIANT_KEYS = ("tower", "precision", "format", "file", "sha256")


@dataclass(frozen=True)
class Variant:
    """One compiled form of one tower: an ONNX file or a TensorRT plan."""

    tower: str  # "image" or "text"
    precision: str  # a registered precision (clipdeploy.precisions)
    format: str  # "onnx" or "tensorrt"
    file: str  # path relative to the artifact directory
    sha256: str
    external_data: tuple[str, ...] = ()  # ONNX external-data files, relative, with their own sums
    external_sha256: tuple[str, ...] = ()
    validation: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # opset, profile, TensorRT version, GPU

    @property
    def accepted(self) -> bool:
        """Whether this variant passed its accuracy gate."""
        return bool(self.validation.get("passed"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Variant:
        known = {*_VARIANT_KEYS, "external_data", "validation"}
        external = d.get("external_data") or []
        return cls(
            tower=d["tower"],
            precision=d["precision"],
            format=d["format"],
            file=d["file"],
            sha256=d["sha256"],
            external_data=tuple(e["file"] for e in external),
            external_sha256=tuple(e["sha256"] for e in external),
            validation=dict(d.get("validation") or {}),
            extra={k: v for k, v in d.items() if k not in known},
        )



def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    except PermissionError as e:
        raise unreadable(path, e) from None
    return digest.hexdigest()


class PendingFile:
    """A file written in full beside its destination under a locked temporary name, not yet in place.

    :meth:`commit` renames it into place (inside :func:`~clipdeploy.artifact.staging.artifact_lock` when a
    manifest entry names it, so that the file and its entry change together); :meth:`discard`
    removes it. The temporary stays locked until then, so :func:`~clipdeploy.artifact.staging.clean_stale_writes`
    tells it from a dead writer's. The file gets the mode the umask gives, not tempfile's 0600.
    """

    def __init__(self, path: Path, data: Any) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            self.tmp = self.path.parent / f".{self.path.name}.{os.urandom(4).hex()}.tmp"
            fd = lock_new_file(self.tmp)
            if fd is not None:
                break
        else:  # pragma: no cover - 100 collisions of 32 random bits
            raise FileExistsError(f"no free temporary name beside {self.path}")
        self._fd: int | None = fd
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(memoryview(data))
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            self.discard()
            raise

    def commit(self) -> Path:
        """Rename the file into place (still locked: a cleaner cannot take it from under us)."""
        try:
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        self._close()
        return self.path

    def discard(self) -> None:
        if self._fd is not None:
            self.tmp.unlink(missing_ok=True)
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def atomic_write_bytes(path: Path, data: Any) -> None:
    """Write a file (bytes or any buffer) so that readers see either the old content or the whole new one.

    The file gets the mode the umask gives (0644 under 022), not tempfile's private 0600.
    """
    PendingFile(path, data).commit()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def swap_directory(work: Path, output: Path) -> None:
    """Move a finished ``work`` directory to ``output``, replacing what was there only once the new
    one is in place; if the move fails, the previous directory is put back. The previous one waits
    under a locked temporary name, so that a run killed mid-swap is undone by the next
    (``staging.clean_beside``)."""
    if not output.exists():
        os.replace(work, output)
        return
    with reserved(output.parent, output_temporaries(output)[1], create=False) as old:
        os.replace(output, old)
        try:
            os.replace(work, output)
        except BaseException:
            os.replace(old, output)
            raise
    # Leaving `reserved` removes the previous directory.


def write_manifest(artifact_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json``. A stage that read the manifest to change it does both inside
    ``staging.artifact_lock(artifact_dir)`` (see :func:`updating_manifest`)."""
    path = Path(artifact_dir) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


@contextmanager
def updating_manifest(artifact_dir: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Read the manifest under the artifact's lock, let the caller change it, and write it back.

    The lock is held from the read to the write, so concurrent stages (int8 and fp16 quantized by
    parallel CI jobs) never lose each other's entries; rename the files the new entries name into
    place inside the ``with`` too. Nothing slow belongs inside: other stages wait for it. Nothing is
    written if the body raises.
    """
    root = Path(artifact_dir)
    with artifact_lock(root):
        manifest = read_manifest(root)
        yield manifest
        write_manifest(root, manifest)


def _parse_version(text: Any) -> tuple[int, int]:
    try:
        major, minor = str(text).split(".")
        return int(major), int(minor)
    except ValueError:
        raise ArtifactError(
            f"manifest schema_version {text!r} is not MAJOR.MINOR; the manifest is corrupt, re-export the model"
        ) from None


def read_manifest(artifact_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a manifest: present, valid JSON, a schema this version understands."""
    root = Path(artifact_dir)
    path = root / MANIFEST_NAME
    try:
        return _read_manifest(root, path)
    except PermissionError as e:
        raise unreadable(path, e) from None


def _read_manifest(root: Path, path: Path) -> dict[str, Any]:
    if not root.is_dir():
        raise ArtifactError(f"artifact directory {str(root)!r} does not exist; run `clipdeploy export` first")
    if not path.is_file():
        raise ArtifactError(
            f"{str(path)!r} is missing: {str(root)!r} is not a clipdeploy artifact; run `clipdeploy export` to make one"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{str(path)!r} is corrupt ({e}); re-export the model with --force") from e
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{str(path)!r} is corrupt (not a JSON object); re-export the model with --force")
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ArtifactError(
            f"{str(path)!r} lacks {', '.join(missing)}; the manifest is corrupt, re-export the model with --force"
        )
    major, _ = _parse_version(manifest["schema_version"])
    ours, _ = _parse_version(SCHEMA_VERSION)
    if major > ours:
        raise ArtifactError(
            f"{str(path)!r} has schema {manifest['schema_version']}, newer than this clipdeploy reads "
            f"({ours}.x); upgrade: pip install -U clipdeploy"
        )
    _check_contents(root, path, manifest)
    for i, v in enumerate(manifest["variants"]):
        if not isinstance(v, dict) or any(k not in v for k in _VARIANT_KEYS):
            raise ArtifactError(
                f"{str(path)!r}: variant #{i} lacks one of {', '.join(_VARIANT_KEYS)}; re-export the model with --force"
            )
    return manifest


def _check_contents(root: Path, path: Path, manifest: dict[str, Any]) -> None:
    """Types of every key clipdeploy reads, and every listed path inside ``root``: before any file is opened."""
    try:
        check_schema(manifest)
    except SchemaError as e:
        raise ArtifactError(f"{str(path)!r}: {e}; the manifest is corrupt, re-export the model with --force") from None
    check_paths(root, manifest)


def variants(manifest: dict[str, Any]) -> list[Variant]:
    return [Variant.from_dict(v) for v in manifest["variants"]]


def verify_files(root: Path, entries: Iterable[tuple[str, str]]) -> None:
    """Check (relative path, sha256) pairs; the first mismatch raises."""
    for rel, expected in entries:
        path = resolve_member(root, rel)  # also for entries that did not come through read_manifest
        if not path.is_file():
            raise ArtifactError(f"{str(path)!r} is listed in the manifest but missing; re-export the model with --force")
        actual = file_sha256(path)
        if actual != expected:
            raise ArtifactError(
                f"{str(path)!r} has sha256 {actual[:12]}…, the manifest says {expected[:12]}…: "
                "the file changed or is corrupt; re-export the model with --force"
            )


def variant_files(variant: Variant) -> list[tuple[str, str]]:
    return [(variant.file, variant.sha256), *zip(variant.external_data, variant.external_sha256, strict=True)]
