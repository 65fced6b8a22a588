"""`clipdeploy triton`: a Triton Inference Server model repository from artifact directories.

``build_repository(TritonConfig(artifacts=[...], output=...))`` writes it; see
:mod:`clipdeploy.triton.repository`. ``config.py`` holds the options, ``plan.py`` decides what to write
from each artifact's view, ``write.py`` writes it. Nothing heavy is imported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipdeploy.triton.config import TritonConfig

__all__ = ["build_repository"]


def build_repository(cfg: TritonConfig) -> dict[str, Any]:
    """Write the repository; see :func:`clipdeploy.triton.repository.build_repository`."""
    # here, not at the top: importing the package must not load its heavier modules
    from clipdeploy.triton.repository import build_repository as _build

    return _build(cfg)
