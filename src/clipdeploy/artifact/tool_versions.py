"""Installed versions of the tools an artifact, a report or a pipeline fingerprint records."""

from __future__ import annotations

import platform
from importlib import metadata

# A distribution that ships under another name too: the GPU build of onnxruntime is the same package.
ALIASES = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu")}


def installed(dist: str) -> str | None:
    """The installed version of a distribution, None when it is absent (aliases count, see ALIASES)."""
    for name in ALIASES.get(dist, (dist,)):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions(*dists: str) -> dict[str, str | None]:
    """Each distribution's installed version, None when absent: a fingerprint sees one appear or go."""
    return {dist: installed(dist) for dist in dists}


def found_versions(*dists: str) -> dict[str, str]:
    """Python's version and those of the distributions that are installed, for a record of what ran."""
    found = {"python": platform.python_version()}
    found.update({dist: v for dist, v in versions(*dists).items() if v is not None})
    return found
