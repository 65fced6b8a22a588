"""Polygraphy's comparator and results files, for `clipdeploy validate`.

Polygraphy is a build- and debug-time dependency (in the `tensorrt` extras): it is imported by the
functions here, never by ``import clipdeploy`` or the runtime. Our own TensorRT runner produces the
outputs; Polygraphy compares them with ONNX Runtime per output, and stores them as RunResults JSON,
so a run on a GPU machine can be compared on any machine later (`--save-results`, `--load-results`).

A results file holds, per engine, two runners: ``tensorrt:KEY`` (its outputs, one iteration per batch
size) and ``inputs:KEY`` (the inputs those iterations ran on), where KEY is
``TOWER:PRECISION:SOURCE_SHA256:ENGINE_FILE``, so the file says on its own what to compare it with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy.deps import require
from clipdeploy.errors import ArtifactError, UsageError

OUTPUTS, INPUTS = "tensorrt", "inputs"
REFERENCE = "onnxruntime"


def _polygraphy() -> tuple[Any, Any]:
    comparator = require("polygraphy.comparator", "tensorrt")
    logger = require("polygraphy.logger", "tensorrt").G_LOGGER
    # Its per-output tables and summaries would repeat what our one line per failure says.
    logger.module_severity = logger.CRITICAL
    return comparator, logger


@dataclass(frozen=True)
class Tolerance:
    """Polygraphy's per-output tolerance: an element fails when it exceeds both atol and rtol."""

    atol: float
    rtol: float


@dataclass
class EngineRun:
    """What one engine produced: per iteration, the inputs it ran on and its outputs."""

    tower: str
    precision: str
    source_sha256: str
    file: str
    inputs: list[dict[str, np.ndarray]]
    outputs: list[dict[str, np.ndarray]]

    @property
    def key(self) -> str:
        return f"{self.tower}:{self.precision}:{self.source_sha256}:{self.file}"


def compare_outputs(
    got: list[dict[str, np.ndarray]], want: list[dict[str, np.ndarray]], tolerances: dict[str, Tolerance | None]
) -> dict[str, dict[str, Any]]:
    """Polygraphy's CompareFunc.simple (elementwise) on each output over every iteration.

    Returns per output the worst abs and rel error (what atol alone, or rtol alone, would have needed
    to pass), the tolerance checked and the verdict; an output with tolerance None is measured, not gated.
    """
    comparator, _ = _polygraphy()
    results = comparator.RunResults()
    results.add(got, runner_name=OUTPUTS)
    results.add(want, runner_name=REFERENCE)
    gated = {k: t for k, t in tolerances.items() if t is not None}
    # Outputs not gated get an infinite tolerance: Polygraphy still measures them.
    compare = comparator.CompareFunc.simple(
        atol={"": float("inf"), **{k: t.atol for k, t in gated.items()}},
        rtol={"": float("inf"), **{k: t.rtol for k, t in gated.items()}},
        check_error_stat="elemwise",
    )
    # One AccuracyResult per compare function (Polygraphy 0.53: a list of them); ours is the only one.
    (accuracy,) = comparator.Comparator.compare_accuracy(results, comparisons=[(0, 1)], compare_func=compare)
    per_iteration = accuracy[(OUTPUTS, REFERENCE)]
    report: dict[str, dict[str, Any]] = {}
    for name in got[0]:
        stats = [it[name] for it in per_iteration if name in it]
        if len(stats) != len(got):
            raise ArtifactError(f"output {name!r} is missing from some iterations of the ONNX Runtime reference")
        tol = tolerances.get(name)
        report[name] = {
            "max_abs_err": max(float(s.max_absdiff) for s in stats),
            "max_rel_err": max(float(s.max_reldiff) for s in stats),
            "atol": tol.atol if tol else None,
            "rtol": tol.rtol if tol else None,
            "passed": all(bool(s) for s in stats) if tol else None,
        }
    return report


def failures(name: str, report: dict[str, dict[str, Any]]) -> list[str]:
    """One line per output Polygraphy failed, with the tolerance that would have passed."""
    return [
        f"{name}: Polygraphy output {out!r} exceeds atol {r['atol']:.3e} / rtol {r['rtol']:.3e} "
        f"(would pass at atol {r['max_abs_err']:.3e} with rtol 0, or rtol {r['max_rel_err']:.3e} with atol 0)"
        for out, r in report.items()
        if r["passed"] is False
    ]


def save(path: Path, runs: list[EngineRun]) -> None:
    """Write every engine's inputs and outputs as one Polygraphy RunResults JSON file."""
    comparator, _ = _polygraphy()
    results = comparator.RunResults()
    for run in runs:
        results.add(run.outputs, runner_name=f"{OUTPUTS}:{run.key}")
        results.add(run.inputs, runner_name=f"{INPUTS}:{run.key}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    results.save(str(tmp))
    tmp.replace(path)  # nothing half-written under the name asked for


def load(path: Path) -> list[EngineRun]:
    """The engine runs in a results file written by :func:`save`."""
    if not path.is_file():
        raise UsageError(f"--load-results {str(path)!r} does not exist; write one with `clipdeploy validate --save-results`")
    comparator, _ = _polygraphy()
    try:
        results = comparator.RunResults.load(str(path))
    except Exception as e:  # Polygraphy raises its own error types for malformed files
        raise UsageError(f"--load-results {str(path)!r} is not a Polygraphy RunResults file ({type(e).__name__}: {e})") from None
    by_name = dict(results.items())
    runs = []
    for name, iterations in by_name.items():
        kind, _, key = name.partition(":")
        if kind != OUTPUTS:
            continue
        parts = key.split(":", 3)
        inputs = by_name.get(f"{INPUTS}:{key}")
        if len(parts) != 4 or inputs is None or len(inputs) != len(iterations):
            raise UsageError(
                f"--load-results {str(path)!r}: runner {name!r} is not one `clipdeploy validate --save-results` wrote "
                "(it needs a matching inputs runner); save the results again"
            )
        tower, precision, sha, file = parts
        runs.append(
            EngineRun(
                tower, precision, sha, file,
                inputs=[{k: np.asarray(v) for k, v in it.items()} for it in inputs],
                outputs=[{k: np.asarray(v) for k, v in it.items()} for it in iterations],
            )
        )  # fmt: skip
    if not runs:
        raise UsageError(f"--load-results {str(path)!r} holds no TensorRT results; save them with --save-results")
    return runs
