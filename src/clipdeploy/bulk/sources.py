"""Enumerate dataset items: image folders, webdataset-style tars, parquet/CSV path columns, text files.

Each item has a stable key, unique within its source: the path relative to the folder, the tar member's
key (its name without the extension), the path as a table's path column writes it (a relative one is
read relative to the table's folder), or the row (0-based line or table row) of a text. Items are small
and picklable (no pixels): workers read the bytes when they embed them.
"""

from __future__ import annotations

import csv
import glob
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from clipdeploy.deps import require
from clipdeploy.errors import InputError, UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLE_EXTENSIONS = (".parquet", ".csv")


@dataclass(frozen=True, order=True)
class Item:
    """One thing to embed. ``source`` is the SOURCE argument it came from; ``locator`` says where its data is:
    a file path, ``(tar path, member name)``, or the text itself."""

    source: str
    key: str
    locator: str | tuple[str, str]
    caption: str | None = None


def expand_braces(pattern: str) -> list[str]:
    """``shard-{000..009}.tar`` and ``{a,b}`` expanded as a shell would (zero padding kept)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end() :], m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        options = [str(n).zfill(width) for n in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        return [head + "{" + body + "}" + t for t in expand_braces(tail)]
    return [out for opt in options for out in expand_braces(head + opt + tail)]


def resolve_sources(sources: list[str]) -> list[str]:
    """Every SOURCE argument as existing paths: braces expanded, globs matched; one line for a missing one."""
    if not sources:
        raise UsageError("no SOURCE given; pass image folders, .tar shards, or parquet/CSV files")
    paths: list[str] = []
    for arg in sources:
        for pattern in expand_braces(arg):
            if glob.has_magic(pattern):
                found = sorted(glob.glob(pattern))
                if not found:
                    raise UsageError(f"source {arg!r}: the pattern {pattern!r} matches no file; check the path")
                paths += found
            elif not os.path.exists(pattern):
                raise UsageError(f"source {pattern!r} does not exist; check the path")
            else:
                paths.append(pattern)
    return list(dict.fromkeys(paths))


def enumerate_items(sources: list[str], *, texts: bool = False, column: str | None = None) -> list[Item]:
    """All items of all sources, sorted by (source, key); a source with no items is a one-line error."""
    items: list[Item] = []
    for path in resolve_sources(sources):
        found = _texts(path, column or "text") if texts else _images(path, column or "path")
        if not found:
            what = "no text lines" if texts else "no images (" + ", ".join(IMAGE_EXTENSIONS[:4]) + "...)"
            raise UsageError(f"source {path!r} holds {what}; check the path, or drop it from the sources")
        keys = [i.key for i in found]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise InputError(f"source {path!r} has the key {dup!r} twice; keys must be unique within a source")
        items += found
    return sorted(items)


def _images(path: str, column: str) -> list[Item]:
    p = Path(path)
    if p.is_dir():
        return [
            Item(path, f.relative_to(p).as_posix(), str(f))
            for f in sorted(p.rglob("*"))
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        ]
    suffix = p.suffix.lower()
    if suffix == ".tar":
        return _tar_items(path)
    if suffix in TABLE_EXTENSIONS:
        base = p.parent  # a relative path in a table is relative to the table's folder, not to the cwd
        return [Item(path, v, v if os.path.isabs(v) else str(base / v)) for _, v in _column(path, column)]
    if suffix in IMAGE_EXTENSIONS:
        return [Item(path, p.name, path)]
    raise UsageError(
        f"source {path!r} is not a folder, .tar, .parquet, .csv or image file; pass one of those"
    )


def tar_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """The file members; a tar cut short (a killed download) keeps those before the cut, and the member
    the cut runs through fails when it is read, so it lands in the errors file rather than stopping the run."""
    found: list[tarfile.TarInfo] = []
    while True:
        try:
            m = tar.next()
        except tarfile.ReadError:
            if not found:
                raise
            break
        if m is None:
            break
        found.append(m)
    return [m for m in found if m.isfile()]


def _tar_items(path: str) -> list[Item]:
    """Webdataset grouping: members sharing a key (the name up to the first dot of the base name)."""
    try:
        with tarfile.open(path) as tar:
            members = tar_members(tar)
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            for m in members:
                directory, _, base = m.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                key = f"{directory}/{stem}" if directory else stem
                groups.setdefault(key, {})["." + ext.lower()] = m
            items = []
            for key, parts in sorted(groups.items()):
                image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
                if image is None:
                    continue
                caption = None
                if ".txt" in parts:
                    caption = _caption(tar, parts[".txt"])
                items.append(Item(path, key, (path, image.name), caption))
            return items
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"source {path!r} is not a readable tar ({e}); check the file") from e


def _caption(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str | None:
    try:
        f = tar.extractfile(member)
        return f.read().decode("utf-8", errors="replace").strip() if f else None
    except (tarfile.TarError, OSError):  # cut short with the tar: the image beside it still embeds
        return None


def _column(path: str, column: str) -> list[tuple[int, str]]:
    """(row, value) of each non-empty cell of ``column``; rows count from 0, not counting a CSV header."""
    if path.lower().endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if column not in (reader.fieldnames or []):
                raise UsageError(f"source {path!r} has no column {column!r} (it has {reader.fieldnames}); "
                                 "pass --column NAME")
            return [(i, row[column]) for i, row in enumerate(reader) if row[column]]
    pq = require("pyarrow.parquet", "bulk")
    try:
        names = pq.read_schema(path).names
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError...
        raise InputError(f"source {path!r} is not a readable parquet file ({type(e).__name__}: {e}); check it") from e
    if column not in names:
        raise UsageError(f"source {path!r} has no column {column!r} (it has {names}); pass --column NAME")
    values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    return [(i, str(v)) for i, v in enumerate(values) if v is not None and str(v)]


def _texts(path: str, column: str) -> list[Item]:
    if path.lower().endswith(TABLE_EXTENSIONS):
        return [Item(path, f"{i}", t) for i, t in _column(path, column)]
    if os.path.isdir(path) or path.lower().endswith(".tar"):
        raise UsageError(f"--texts source {path!r} is not a text file; pass a file with one text a line, "
                         "or a parquet/CSV file and --column")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    except UnicodeDecodeError as e:
        raise InputError(f"--texts source {path!r} is not UTF-8 text ({e}); pass a text file") from e
    return [Item(path, f"{i}", t) for i, t in enumerate(lines) if t.strip()]
