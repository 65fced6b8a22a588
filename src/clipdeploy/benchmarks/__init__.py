"""Latency and throughput benchmarks of an artifact's variants against the PyTorch reference.

``clipdeploy bench DIR`` (see :mod:`clipdeploy.benchmarks.command`) measures every variant the
artifact holds that a backend here can run, beside the open_clip model with the same weights, on
identical inputs, and writes JSON, Markdown and PNG reports. The repository's ``tools/bench_matrix.py``
runs it over several models and writes ``docs/benchmarks.md``.

Nothing heavy is imported here: torch, open_clip, onnxruntime and matplotlib load inside the
functions that use them.
"""

from __future__ import annotations

__all__ = ["BenchConfig", "run_bench"]

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipdeploy.benchmarks.config import BenchConfig


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run a benchmark and return its report (see :mod:`clipdeploy.benchmarks.report` for the schema)."""
    # here, not at the top: importing the package must not load its heavier modules
    from clipdeploy.benchmarks.bench import run_bench as _run

    return _run(cfg)


def __getattr__(name: str) -> Any:
    if name == "BenchConfig":
        # here, not at the top: importing the package must not load its heavier modules
        from clipdeploy.benchmarks.config import BenchConfig

        return BenchConfig
    raise AttributeError(name)
