"""Which Triton Inference Server release carries which TensorRT version.

A TensorRT plan loads only in the TensorRT version that built it (MAJOR.MINOR.PATCH), unless it was
built version-compatible, which later versions of the same major also load. So engines built here
need the Triton container whose TensorRT matches. The table lists the releases this clipdeploy knows
that carry a TensorRT it can build with (10.13 and up); ``verified`` says whether the version was
checked against NVIDIA's release notes or container contents when this table was written. For any
other release, pass its TensorRT version (``--triton-tensorrt``); inside the container,
``ls /usr/lib/x86_64-linux-gnu/libnvinfer.so.*`` shows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from packaging.version import InvalidVersion, Version


@dataclass(frozen=True)
class Release:
    """One Triton container release (nvcr.io/nvidia/tritonserver:<name>-py3)."""

    name: str  # YY.MM
    tensorrt: str  # MAJOR.MINOR.PATCH of the TensorRT inside
    verified: bool  # checked against NVIDIA's published contents; False: expected, check before relying on it


RELEASES = (
    Release("25.08", "10.13.2", True),
    Release("25.09", "10.13.3", False),
    Release("25.10", "10.13.3", False),
)


def base(version: str) -> Version | None:
    """MAJOR.MINOR.PATCH of a TensorRT version string, or None when it is not a version."""
    try:
        parts = [*Version(str(version)).release, 0, 0][:3]  # "11.4" and "11.4.0.1" both mean 11.4.0
        return Version(".".join(str(p) for p in parts))
    except InvalidVersion:
        return None


def loads_in(engine_version: str, server_version: str, version_compatible: bool) -> bool:
    """Whether a plan built by TensorRT ``engine_version`` loads in TensorRT ``server_version``."""
    built, server = base(engine_version), base(server_version)
    if built is None or server is None:
        return False
    if version_compatible:
        return server.major == built.major and server >= built
    return server == built


def matching(engine_version: str, version_compatible: bool = False) -> list[Release]:
    """The known releases whose TensorRT loads plans from ``engine_version``."""
    return [r for r in RELEASES if loads_in(engine_version, r.tensorrt, version_compatible)]


def find(name: str) -> Release | None:
    return next((r for r in RELEASES if r.name == name), None)


def image(release: str) -> str:
    return f"nvcr.io/nvidia/tritonserver:{release}-py3"
