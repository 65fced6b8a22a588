"""`clipdeploy bench`: parse, build a BenchConfig, run, print the table. Imports nothing heavy."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from clipdeploy.errors import UsageError


def _csv(option: str, text: str | None, choices: tuple[str, ...] | None = None) -> tuple[str, ...] | None:
    if text is None:
        return None
    items = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    if not items:
        example = ",".join(choices or ("1", "8"))
        raise UsageError(f"{option} {text!r} names nothing; pass a comma-separated list, e.g. {option} {example}")
    for x in items:
        if choices is not None and x not in choices:
            raise UsageError(f"{option} has {x!r}, which is not one of {', '.join(choices)}")
    return items


def _int(option: str, text: str | None, minimum: int) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not an integer; pass a whole number of {minimum} or more") from None
    if value < minimum:
        raise UsageError(f"{option} {value} must be {minimum} or more")
    return value


def _batches(text: str) -> tuple[int, ...]:
    items = _csv("--batch", text) or ()
    return tuple(dict.fromkeys(_int("--batch", x, 1) or 1 for x in items))


def _seconds(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--max-seconds {text!r} is not a number; pass seconds, e.g. --max-seconds 20") from None
    if not value > 0:
        raise UsageError(f"--max-seconds {value:g} must be more than 0; leave it out for no limit")
    return value


def config_from_args(args: argparse.Namespace) -> Any:
    """A BenchConfig from parsed arguments; every bad value is a one-line UsageError."""
    from clipdeploy.benchmarks.bench import BenchConfig
    from clipdeploy.benchmarks.contenders import BACKENDS, backends
    from clipdeploy.benchmarks.harness import TimingConfig
    from clipdeploy.manifest import TOWERS
    from clipdeploy.precisions import names as precision_names

    artifact = Path(args.artifact)
    if not artifact.is_dir():
        raise UsageError(f"artifact directory {str(artifact)!r} does not exist; run `clipdeploy export` first")
    output = Path(args.output) if args.output else artifact / "bench"
    if output.exists() and not output.is_dir():
        raise UsageError(f"-o {str(output)!r} is a file; pass a directory for the reports")
    iters = _int("--iters", args.iters, 1) or 30
    return BenchConfig(
        artifact=artifact,
        output=output,
        backends=_csv("--backends", args.backends, backends()) or BACKENDS,
        precisions=_csv("--precisions", args.precisions, precision_names()),
        batches=_batches(args.batch),
        towers=_csv("--towers", args.towers, TOWERS) or TOWERS,
        timing=TimingConfig(
            iters=iters,
            warmup=5 if args.warmup is None else _int("--warmup", args.warmup, 0) or 0,
            max_seconds=_seconds(args.max_seconds),
            min_iters=min(3, iters),
        ),
        threads=_int("--threads", args.threads, 1),
        device=args.device,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        graph_optimization_level=args.graph_optimization_level,
        prompt_length=_int("--prompt-length", args.prompt_length, 2),
        isolate=not args.in_process,
        progress=not args.no_progress,
        machine=args.machine,
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from clipdeploy.benchmarks.bench import run_bench
    from clipdeploy.benchmarks.report import terminal_table

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
    from clipdeploy.benchmarks.contenders import BACKENDS, DEVICES, default_precisions
    from clipdeploy.manifest import TOWERS
    from clipdeploy.precisions import names as precision_names

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
    p.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        metavar="LIST",
        help=f"comma-separated, from {','.join(BACKENDS)} (default: all; unavailable ones are skipped with a reason)",
    )
    p.add_argument(
        "--precisions",
        metavar="LIST",
        help=f"variant precisions to measure, from {','.join(precision_names())} (default: those the runtime "
        f"would pick on this device: {' and '.join(default_precisions('cpu'))} on CPU); PyTorch always runs "
        "the reference",
    )
    p.add_argument("--batch", default="1,8,32", metavar="LIST", help="batch sizes (default: 1,8,32)")
    p.add_argument("--towers", default=",".join(TOWERS), metavar="LIST", help="default: image,text")
    p.add_argument("--iters", default="30", metavar="N", help="timed calls per case (default: 30)")
    p.add_argument("--warmup", default="5", metavar="N", help="untimed calls first (default: 5)")
    p.add_argument(
        "--max-seconds",
        metavar="S",
        help="stop timing a case after S seconds, once 3 calls are timed (default: no limit)",
    )
    p.add_argument("--threads", metavar="N", help="intra-op threads for every contender (default: the cores available)")
    p.add_argument(
        "--device",
        default="auto",
        help=f"{', '.join(DEVICES)} (default: auto, cuda when nvidia-smi sees a GPU, else cpu)",
    )
    p.add_argument("--checkpoint", metavar="FILE", help="the checkpoint the artifact was exported from (for PyTorch)")
    p.add_argument(
        "--graph-optimization-level",
        default="all",
        metavar="LEVEL",
        help="ONNX Runtime graph optimizations: disable, basic, extended or all (default: all)",
    )
    p.add_argument("--prompt-length", metavar="N", help="short text length (default: the longest bundled prompt)")
    p.add_argument(
        "--machine", metavar="NAME", help="name the machine in the reports (default: CPU model, cores, memory, GPU)"
    )
    p.add_argument(
        "--in-process", action="store_true", help="measure every contender in this process instead of one process each"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)
