"""`clipdeploy bench`: parse, build a BenchConfig, run, print the table. Imports nothing heavy."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from clipdeploy import options
from clipdeploy.benchmarks.bench import run_bench
from clipdeploy.benchmarks.config import BenchConfig
from clipdeploy.benchmarks.harness import TimingConfig
from clipdeploy.benchmarks.report import terminal_table
from clipdeploy.errors import UsageError
from clipdeploy.options import add_dataclass_options


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """A BenchConfig from parsed arguments; every bad value is a one-line UsageError."""
    artifact = Path(args.artifact)
    if not artifact.is_dir():
        raise UsageError(f"artifact directory {str(artifact)!r} does not exist; run `clipdeploy export` first")
    output = Path(args.output) if args.output else artifact / "bench"
    if output.exists() and not output.is_dir():
        raise UsageError(f"-o {str(output)!r} is a file; pass a directory for the reports")
    timing = options.config_from_args(TimingConfig, args)
    timing = replace(timing, min_iters=min(timing.min_iters, timing.iters))  # --iters 1 is allowed
    return options.config_from_args(BenchConfig, args, artifact=artifact, output=output, timing=timing)


def cmd_bench(args: argparse.Namespace) -> int:
    report = run_bench(config_from_args(args))
    print(terminal_table(report))
    files = report.get("files") or {}
    written = [f for f in (files.get("json"), files.get("markdown"), files.get("png")) if f]
    if written:
        print("wrote " + ", ".join(written))
    if files and not files.get("png"):
        print("no plot: matplotlib is not installed; pip install 'clipdeploy[bench]'")
    return 0


def add_bench(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="measure latency and throughput of each variant against PyTorch",
        description="Measure every variant of an artifact that a backend here can run, beside the open_clip "
        "model with the same weights (PyTorch eager fp32; on a GPU also fp16 autocast and torch.compile), on "
        "identical inputs and thread counts. Reports p50/p90/p99 latency, items per second, peak memory, the "
        "speed-up over PyTorch fp32 and the embedding cosine against it. Writes bench.json, bench.md and "
        "bench.png to -o DIR and prints a table.",
    )
    p.add_argument("artifact", help="artifact directory made by `clipdeploy export`")
    p.add_argument("-o", "--output", metavar="DIR", help="report directory (default: ARTIFACT/bench)")
    add_dataclass_options(p, BenchConfig, ["backends", "precisions", "batches", "towers"])
    add_dataclass_options(p, TimingConfig, ["iters", "warmup", "max_seconds"])
    add_dataclass_options(
        p,
        BenchConfig,
        ["threads", "device", "checkpoint", "graph_optimization_level", "prompt_length", "end_to_end", "machine",
         "isolate", "progress"],
        overrides={"threads": {"help": "intra-op threads for every contender"}},
    )  # fmt: skip
    p.set_defaults(func=cmd_bench)
