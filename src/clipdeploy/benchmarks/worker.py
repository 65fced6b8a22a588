"""Measure one contender on a list of cases; in this process, or alone in a fresh one.

By default each contender runs in its own process (``python -m clipdeploy.benchmarks.worker``):
no thread pool of one contender spins beside another's, a runtime contender never has torch
imported, and each contender's peak memory is its own. Progress goes to stdout as JSON lines.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy.benchmarks.contenders import ContenderSpec, OpenOptions, open_contender
from clipdeploy.benchmarks.harness import (
    TimingConfig,
    gpu_memory_mb,
    measure,
    peak_rss_mb,
    reset_peak_rss,
    summarize,
)
from clipdeploy.benchmarks.inputs import BenchInputs, array_sha256
from clipdeploy.errors import ClipDeployError
from clipdeploy.artifact.view import ArtifactView

EVENT_PREFIX = "@@clipdeploy-bench "


@dataclass(frozen=True)
class Case:
    """One measurement: a tower at one batch size (and, for text, one sequence length)."""

    tower: str  # "image" or "text"
    batch: int
    seq_len: int | None = None  # text: token columns fed; None for images

    @property
    def key(self) -> str:
        return f"{self.tower}/{self.batch}/{self.seq_len or 0}"


@dataclass(frozen=True)
class WorkerJob:
    """Everything one contender's measurement needs; JSON-serializable for the worker process."""

    artifact: Path  # the artifact directory
    spec: ContenderSpec  # what to open
    inputs: Path  # .npz written by BenchInputs.save: every contender reads the same file
    cases: tuple[Case, ...]  # what to measure, in order
    timing: TimingConfig  # iterations, warm-up and budget per case
    options: OpenOptions  # threads, ONNX Runtime optimization level, checkpoint

    def to_json(self) -> str:
        return json.dumps(
            {
                "artifact": str(self.artifact),
                "spec": self.spec.to_dict(),
                "inputs": str(self.inputs),
                "cases": [asdict(c) for c in self.cases],
                "timing": asdict(self.timing),
                "options": {
                    **asdict(self.options),
                    "checkpoint": str(self.options.checkpoint) if self.options.checkpoint else None,
                },
            }
        )

    @classmethod
    def from_json(cls, text: str) -> WorkerJob:
        d = json.loads(text)
        opts = d["options"]
        return cls(
            artifact=Path(d["artifact"]),
            spec=ContenderSpec.from_dict(d["spec"]),
            inputs=Path(d["inputs"]),
            cases=tuple(Case(**c) for c in d["cases"]),
            timing=TimingConfig(**d["timing"]),
            options=OpenOptions(
                threads=opts["threads"],
                graph_optimization_level=opts["graph_optimization_level"],
                checkpoint=Path(opts["checkpoint"]) if opts.get("checkpoint") else None,
            ),
        )


@dataclass
class WorkerResult:
    """What a contender's measurement produced."""

    describe: str  # what actually ran, e.g. the session's description
    results: list[dict[str, Any]]  # one per case: figures, or "skipped" with a reason
    embeddings: dict[str, np.ndarray]  # Case.key -> the un-normalized embeddings of that batch
    error: str | None = None  # set when the contender could not be opened at all


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, ClipDeployError) else f"{type(e).__name__}: {text}"[:300]


def run_job(job: WorkerJob, emit: Callable[[dict[str, Any]], None] | None = None) -> WorkerResult:
    """Open the contender, then measure each case; a failing case is recorded, not raised."""
    emit = emit or (lambda event: None)
    inputs = BenchInputs.load(job.inputs)
    view = ArtifactView.read(job.artifact)
    try:
        contender = open_contender(job.spec, view, job.options)
    except Exception as e:  # a contender that cannot open is reported, and the others still run
        return WorkerResult(describe="", results=[], embeddings={}, error=_one_line(e))
    results: list[dict[str, Any]] = []
    embeddings: dict[str, np.ndarray] = {}
    for i, case in enumerate(job.cases):
        emit({"event": "start", "index": i, "case": asdict(case)})
        base = asdict(case)
        reason = contender.unsupported(case.tower, case.seq_len, inputs.context_length)
        if reason is None:
            x = inputs.batch(case.tower, case.batch, case.seq_len)
            reset_peak_rss()
            try:
                # The first call gives the embeddings compared with the reference; it counts as warm-up.
                out = contender.encode(case.tower, x)
                timing = replace(job.timing, warmup=max(0, job.timing.warmup - 1))
                samples = measure(partial(contender.encode, case.tower, x), timing, contender.timer)
            except Exception as e:  # out of memory, a shape an engine profile refuses, ...
                reason = _one_line(e)
            else:
                stats = summarize(samples, case.batch)
                embeddings[case.key] = np.asarray(out, dtype=np.float32)
                results.append(
                    {
                        **base,
                        **stats.to_dict(),
                        "peak_rss_mb": round(peak_rss_mb(), 1),
                        "gpu_mem_mb": gpu_memory_mb() if job.spec.device == "cuda" else None,
                        "input_sha256": array_sha256(x),
                    }
                )
        if reason is not None:
            results.append({**base, "skipped": reason})
        emit({"event": "done", "index": i, "case": asdict(case), "skipped": reason})
    return WorkerResult(describe=contender.describe(), results=results, embeddings=embeddings)


def save_result(result: WorkerResult, prefix: Path) -> None:
    Path(f"{prefix}.json").write_text(
        json.dumps({"describe": result.describe, "results": result.results, "error": result.error}), encoding="utf-8"
    )
    np.savez(f"{prefix}.npz", **result.embeddings)  # type: ignore[arg-type]


def load_result(prefix: Path) -> WorkerResult:
    meta = json.loads(Path(f"{prefix}.json").read_text(encoding="utf-8"))
    with np.load(f"{prefix}.npz") as z:
        embeddings = {k: z[k] for k in z.files}
    return WorkerResult(meta["describe"], meta["results"], embeddings, meta.get("error"))


def main(argv: list[str] | None = None) -> int:
    """``python -m clipdeploy.benchmarks.worker JOB.json OUT_PREFIX``: measure, write OUT_PREFIX.{json,npz}."""
    import logging
    import warnings

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m clipdeploy.benchmarks.worker JOB.json OUT_PREFIX", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    job = WorkerJob.from_json(Path(args[0]).read_text(encoding="utf-8"))

    def emit(event: dict[str, Any]) -> None:
        sys.stdout.write(EVENT_PREFIX + json.dumps(event) + "\n")
        sys.stdout.flush()

    save_result(run_job(job, emit), Path(args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
