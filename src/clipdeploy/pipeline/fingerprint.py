"""What a stage's outputs depend on, reduced to a key.

A stage's *inputs* are a flat JSON-able dict (config values, content hashes of the files it reads,
tool versions, the GPU and TensorRT version for engines, and the keys of the stages it builds on);
its key is the sha256 of that dict. The inputs are kept beside the key, so a re-run can say which
input changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from clipdeploy.calibration.sources import list_images
from clipdeploy.artifact.manifest import file_sha256


def key_of(inputs: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``inputs``."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


_BY_PART = frozenset({"tools", "target", "machine"})  # inputs whose changed parts are named one by one


def changed(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """The inputs that differ between two input dicts; versions and targets by part (``tools.onnxruntime``)."""
    if not old:
        return []

    def same(a: Any, b: Any) -> bool:
        return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)

    out = []
    for k in sorted(set(old) | set(new)):
        if (k in old) != (k in new):  # an input that is new (or gone) counts, even when it is null
            out.append(k)
            continue
        a, b = old[k], new[k]
        if same(a, b):
            continue
        if k in _BY_PART and isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{sub}" for sub in sorted(set(a) | set(b)) if not same(a.get(sub), b.get(sub))]
        else:
            out.append(k)
    return out


def image_sources_digest(paths: list[Path]) -> dict[str, Any]:
    """A content fingerprint of calibration image sources: every image file (or tar shard) they hold.

    Uses the same listing as the quantize stage, so it sees exactly the files the stage would read.
    Any change to an image's bytes, an added or removed image, changes it.
    """
    samples = list_images(paths)
    digest = hashlib.sha256()
    files: dict[Path, str] = {}
    for s in samples:
        if s.path not in files:
            files[s.path] = file_sha256(s.path)
        digest.update(f"{s.member or ''}\0{files[s.path]}\n".encode())
    return {"files": len(files), "images": len(samples), "sha256": digest.hexdigest()}


def path_digest(path: Path) -> str:
    """Content fingerprint of a file (its sha256) or a folder (every file's relative path and sha256)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            digest.update(f"{p.relative_to(path).as_posix()}\0{file_sha256(p)}\n".encode())
        return f"dir:{digest.hexdigest()}"
    return f"missing:{path}"  # the stage itself will say what is wrong with it


def config_values(cfg: Any, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """A dataclass's fields as JSON-able values, minus ``exclude``.

    Paths become content fingerprints, not names: a checkpoint, model config, tokenizer folder or
    caption file that changes in place changes the key, and one that moves does not.
    """

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return path_digest(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name not in exclude}
