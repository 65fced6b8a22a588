"""The make-step contract: what `clipdeploy quantize` hands a precision's make step, and what it gets back.

A precision's ``PrecisionSpec.make`` names a ``MakeStep``: a function ``(MakeRequest) -> MadeVariant``
that writes one tower's variant to ``req.out``. The stage calls it once per tower, and again in each
recovery round with more nodes in ``req.exclude``; it then checks the file, gates it and records it. A
precision whose variant runs another precision's file (``PrecisionSpec.runs_file_of``) writes nothing:
its step is ``runs_file``, or one like it.

The built-in steps live beside their passes: ``quantize/fp16.py``, ``int8.py`` (int8 and int8-fp16),
``fp8.py`` and ``bf16.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from clipdeploy import precisions
from clipdeploy.quantize.config import QuantizeConfig

CALIB_BATCH = 8  # calibration samples per feed


@dataclass(frozen=True)
class MakeRequest:
    """Everything a make step needs to make one tower's variant."""

    tower: str  # "image" or "text"
    # The file it starts from: the tower's fp32 file, or, for a precision with runs_file_of, the file it runs.
    source: Path
    source_sha256: str  # the manifest's sum of ``source`` (calibration caches are keyed by it)
    out: Path  # where to write the variant (a step that runs another file writes nothing)
    work: Path  # the run's scratch folder, inside the artifact; kept across recovery rounds, removed after
    artifact: Path  # the artifact directory (calibration caches are kept in it, under calibration/)
    cfg: QuantizeConfig  # the run's options: method, fp8_patch_embedding, ...
    calibration: np.ndarray  # the tower's calibration inputs; the held-out ones are never handed to a step
    input_name: str  # the tower's input, which feeds are keyed by
    fingerprint: str  # identifies the calibration samples (calibration caches are keyed by it)
    exclude: tuple[str, ...] = ()  # MatMul/Gemm/Conv nodes to keep unquantized (--keep-node, recovery)
    suffix: str = ""  # "" on the first build, ".rK" in recovery round K: tags the files it writes in ``work``

    @property
    def spec(self) -> precisions.PrecisionSpec:
        return precisions.get(self.cfg.precision)

    def feeds(self, limit: int | None = None) -> list[dict[str, np.ndarray]]:
        """The first ``limit`` calibration samples (all when None), in feeds of CALIB_BATCH."""
        x = self.calibration[:limit]
        return [{self.input_name: x[i : i + CALIB_BATCH]} for i in range(0, len(x), CALIB_BATCH)]

    def scratch(self, kind: str) -> Path:
        """A file of this tower and round in ``work``, e.g. ``image.qdq.r2.onnx`` for kind "qdq"."""
        return self.work / f"{self.tower}.{kind}{self.suffix}.onnx"


@dataclass(frozen=True)
class MadeVariant:
    """What a make step did."""

    info: dict[str, Any]  # recorded in the gate report's "build", per tower: JSON values only
    # The plain int8 Q/DQ graph it made on the way (calibrated precisions): recovery ranks nodes on it.
    qdq: Path | None = None


class MakeStep(Protocol):
    """A precision's make step (``PrecisionSpec.make`` names one as "module:function")."""

    def __call__(self, req: MakeRequest) -> MadeVariant: ...


def runs_file(req: MakeRequest) -> MadeVariant:
    """The make step of a precision that runs another precision's file (``runs_file_of``): nothing is
    written; the report names the file and the settings each backend runs it with."""
    settings = {f"{backend}_{key.lower()}": value
                for backend, entries in req.spec.backend_settings.items() for key, value in entries.items()}
    return MadeVariant({"runs": req.source.relative_to(req.artifact).as_posix(), **settings})
