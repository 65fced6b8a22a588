"""The external-data files an ONNX model names inside itself, read without onnx, and checks on them.

An ONNX file may keep tensors in side files, named by ``location`` entries in the protobuf itself.
Older ONNX Runtime releases (1.18, for one) follow a location such as ``../outside.data`` or a symlink
out of the model's folder, and TensorRT's parser reads them too. So before any of them opens a model
from an artifact, its locations are checked: relative, no ``..``, not a link out of the model's folder,
and (for an artifact variant) exactly among the side files its manifest entry lists and checksums.

A minimal protobuf walk over the messages that hold tensors (model, graphs, nodes, attributes,
functions, training info); tensor payloads are skipped, not read, and the file is memory-mapped.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from clipdeploy.errors import ArtifactError, unreadable

__all__ = ["external_locations", "check_locations", "check_variant_external_data"]

# Field numbers from onnx.proto: message -> {field: message it holds}.
_MODEL, _GRAPH, _NODE, _ATTR, _SPARSE, _TENSOR, _ENTRY, _TRAINING, _FUNCTION = range(9)
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTR},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {13: _ENTRY},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _FUNCTION: {7: _NODE},
}


class _Malformed(ValueError):
    pass


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: Any, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field in buf[pos:end]; other fields skipped."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise _Malformed("a field runs past its message")
            yield number, pos, pos + size
            pos += size
        else:
            raise _Malformed(f"wire type {wire}")
    if pos != end:
        raise _Malformed("a field runs past its message")


def _walk(buf: Any, kind: int, pos: int, end: int, depth: int, out: list[str]) -> None:
    if depth > 64:
        raise _Malformed("nested too deep")
    if kind == _ENTRY:
        key = value = None
        for number, start, stop in _fields(buf, pos, end):
            if number == 1:
                key = bytes(buf[start:stop])
            elif number == 2:
                value = bytes(buf[start:stop])
        if key == b"location" and value is not None:
            out.append(value.decode("utf-8", errors="replace"))
        return
    children = _CHILDREN[kind]
    for number, start, stop in _fields(buf, pos, end):
        child = children.get(number)
        if child is not None:
            _walk(buf, child, start, stop, depth + 1, out)


def external_locations(path: str | Path) -> list[str]:
    """Every external-data ``location`` named inside the ONNX file at ``path``, in file order."""
    path = Path(path)
    out: list[str] = []
    try:
        f = open(path, "rb")
    except PermissionError as e:
        raise unreadable(path, e) from None
    with f:
        if path.stat().st_size == 0:
            return out
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            try:
                _walk(mm, _MODEL, 0, len(mm), 0, out)  # mmap indexes to ints and slices to bytes
            except _Malformed as e:
                why = str(e)
            else:
                return out
    raise ArtifactError(
        f"cannot load {str(path)!r}: it is not a valid ONNX file ({why}); the file is corrupt: re-export the model "
        "with --force"
    )


def _why_outside(folder: Path, location: str) -> str | None:
    posix = PurePosixPath(location.replace("\\", "/"))
    if not location or "\x00" in location:
        return "is empty"
    if posix.is_absolute() or location[1:3] in (":/", ":\\"):
        return "is an absolute path"
    if ".." in posix.parts:
        return "climbs out with '..'"
    try:
        real = (folder / posix).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        return f"is a link that cannot be resolved ({e})"
    if not real.is_relative_to(folder.resolve()):
        return f"resolves to {str(real)!r}, outside the model's folder"
    return None


def check_locations(model: str | Path) -> list[str]:
    """Refuse an ONNX file whose external data lies outside its own folder; returns its locations."""
    model = Path(model)
    locations = external_locations(model)
    for location in dict.fromkeys(locations):
        why = _why_outside(model.parent, location)
        if why is not None:
            raise ArtifactError(
                f"{str(model)!r} names external data {location!r}, which {why}; an ONNX file may read only "
                "files beside it; re-export the model with --force"
            )
    return locations


def check_variant_external_data(root: Path, file: str, listed: tuple[str, ...] | list[str]) -> None:
    """An artifact's ONNX variant reads only the side files its manifest entry lists (and checksums)."""
    model = Path(root) / file
    locations = check_locations(model)
    folder = PurePosixPath(file).parent
    named = {(folder / PurePosixPath(loc.replace("\\", "/"))).as_posix().removeprefix("./") for loc in locations}
    unlisted = sorted(named - {PurePosixPath(e).as_posix().removeprefix("./") for e in listed})
    if unlisted:
        raise ArtifactError(
            f"{str(model)!r} reads external data from {unlisted[0]!r}, which its manifest entry does not list "
            f"(it lists {', '.join(map(repr, listed)) or 'none'}), so no checksum covers it; re-export the model "
            "with --force"
        )
