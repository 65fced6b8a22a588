"""The benchmark matrix: several models, each across its precisions and batch sizes, into docs/benchmarks.md.

    python tools/bench_matrix.py --work-dir artifacts/bench-matrix

A developer tool of the repository (not in the wheel). For each model it runs `clipdeploy run`'s
pipeline, built in memory: export (random weights, offline), the reduced-precision variants when the
precision stage is installed, and TensorRT engines on a GPU when that stage is installed. Like
`clipdeploy run`, it is incremental: what is current in the work directory is not redone. Then it
benchmarks each artifact and writes one Markdown page naming the machine, with every model's table
and plot. Nothing is estimated: a contender that could not run is listed with its reason.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import shutil
import sys
import textwrap
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clipdeploy import options, progress
from clipdeploy.benchmarks.bench import (
    DEFAULT_BATCHES,
    BenchConfig,
    resolve_device,
    run_bench,
)
from clipdeploy.benchmarks.contenders import default_precisions, has_module
from clipdeploy.benchmarks.harness import TimingConfig
from clipdeploy.benchmarks.report import (
    REPORT_DOC_HINT,
    markdown,
    schema_doc,
    summary_rows,
)
from clipdeploy.cli import build_parser
from clipdeploy.engines.command import config_from_args as build_config_from_args
from clipdeploy.errors import ClipDeployError, UsageError
from clipdeploy.export.config import ExportConfig
from clipdeploy.artifact.manifest import atomic_write_text
from clipdeploy.options import config_from_args
from clipdeploy.pipeline.config import ARTIFACT_DIR, ModelPlan, PipelineConfig
from clipdeploy.pipeline.runner import RunOptions, run_pipeline
from clipdeploy.quantize.config import QuantizeConfig
from clipdeploy.precisions import REFERENCE

DEFAULT_MODELS = ("ViT-B-32", "ViT-B-16", "RN50", "convnext_base", "ViT-L-14")
MATRIX_TIMING = TimingConfig(iters=20, warmup=3, max_seconds=30.0)  # shorter than bench's: many models


@dataclass
class MatrixConfig:
    """Everything the matrix takes."""

    work_dir: Path  # artifacts and per-model reports live here; reused between runs
    output: Path = Path("docs/benchmarks.md")  # the page to write; plots go beside it, in benchmarks/
    models: tuple[str, ...] = DEFAULT_MODELS  # open_clip architectures, exported with random weights
    precisions: tuple[str, ...] | None = None  # None: fp32 and int8 on CPU; fp32, fp16, int8, int8-fp16 on GPU
    batches: tuple[int, ...] = DEFAULT_BATCHES
    timing: TimingConfig = field(default_factory=lambda: MATRIX_TIMING)  # shorter than bench's: many models
    threads: int | None = None  # None: the cores available
    device: str = "auto"
    quantize: bool = True  # make the variants (and engines on a GPU) when those stages are installed
    quantize_args: tuple[str, ...] = ()  # `clipdeploy quantize` options for its config, e.g. --calib-images DIR
    build_args: tuple[str, ...] = ()  # `clipdeploy build` options for its config
    machine: str | None = None  # the machine's name on the page; None: CPU model, cores, memory, GPU
    progress: bool = True  # progress bars on stderr
    command: str = ""  # the command line that made the page, shown on it


def _stage_config(command: str, artifact: Path, precision: str, argv: tuple[str, ...]) -> Any:
    """The stage's config from `clipdeploy COMMAND ARTIFACT --precision P ARGV...`, by that command's own parser."""
    parser = build_parser()
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            args = parser.parse_args([command, str(artifact), "--precision", precision, *argv])
    except SystemExit:
        why = said.getvalue().strip().splitlines()[-1:] or ["invalid"]
        raise UsageError(
            f"--{command}-args {shlex.join(argv)!r} are not valid `clipdeploy {command}` options "
            f"({why[0].removeprefix('clipdeploy: error: ')}); see `clipdeploy {command} --help`"
        ) from None
    if command == "build":
        return build_config_from_args(args)
    return config_from_args(QuantizeConfig, args, artifact=artifact)


def model_plan(cfg: MatrixConfig, model: str, device: str, precisions: tuple[str, ...]) -> tuple[ModelPlan, list[str]]:
    """The pipeline entry of one model (bench excluded: the matrix runs it), and notes on stages it lacks."""
    artifact = cfg.work_dir / model / ARTIFACT_DIR
    reduced = tuple(p for p in precisions if p != REFERENCE) if cfg.quantize else ()
    notes: list[str] = []
    if reduced and not has_module("clipdeploy.quantize"):
        notes.append(
            f"no {', '.join(reduced)} variants: the precision stage (`clipdeploy quantize`) is not installed here, "
            "so only fp32 was measured"
        )
        reduced = ()
    engines = device == "cuda" and cfg.quantize
    if engines and not has_module("clipdeploy.engines"):
        notes.append("no TensorRT engines: the build stage (`clipdeploy build`) is not installed here")
        engines = False
    stages = ("export",) + (("quantize",) if reduced else ()) + (("build", "validate") if engines else ())
    quantize = {
        p: replace(_stage_config("quantize", artifact, p, cfg.quantize_args), force=True)
        for p in reduced
    }
    built = (REFERENCE, *reduced) if engines else ()
    build = {
        p: replace(_stage_config("build", artifact, p, cfg.build_args), validate=False)
        for p in built
    }
    plan = ModelPlan(
        name=model,
        export=ExportConfig(model=model, output=artifact, force=True),
        precisions=(REFERENCE, *reduced),
        stages=stages,
        quantize=quantize,
        build=build,
    )
    return plan, notes


def prepare_artifact(
    cfg: MatrixConfig, model: str, device: str, precisions: tuple[str, ...]
) -> tuple[Path | None, list[str]]:
    """Run the model's pipeline (what is current is kept); the artifact, or None, and notes on what was not made."""
    plan, notes = model_plan(cfg, model, device, precisions)
    progress.write(f"[{model}] clipdeploy run: {', '.join(plan.stages)} ...")
    pipeline = PipelineConfig(file=Path(__file__), output=cfg.work_dir, models=[plan])
    summary = run_pipeline(pipeline, RunOptions())
    units = {u["unit"]: u for u in summary["models"][0]["units"]}
    if units["export"]["status"] not in ("ran", "current"):
        return None, [f"export {units['export']['status']}: {units['export']['reason']}"]
    for name, u in units.items():
        if u["status"] in ("failed", "blocked") or (u["status"] == "skipped" and u["stage"] in plan.stages):
            notes.append(f"{name} {u['status']}, so it was not measured: {u['reason']}")
    return plan.artifact, notes


def run_matrix(cfg: MatrixConfig) -> Path:
    """Run every model and write the page; returns its path."""
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    precisions = cfg.precisions or default_precisions(device)
    assets = cfg.output.parent / cfg.output.stem  # docs/benchmarks/ beside docs/benchmarks.md
    sections: list[tuple[str, dict[str, Any] | None, list[str]]] = []
    machine = cfg.machine
    for model in cfg.models:
        art, notes = prepare_artifact(cfg, model, device, precisions)
        if art is None:
            sections.append((model, None, notes))
            progress.write(f"[{model}] skipped: {notes[0]}")
            continue
        progress.write(f"[{model}] benchmarking ...")
        try:
            report = run_bench(
                BenchConfig(
                    artifact=art,
                    output=cfg.work_dir / "reports" / model,
                    precisions=precisions,
                    batches=cfg.batches,
                    timing=cfg.timing,
                    threads=cfg.threads,
                    device=device,
                    progress=cfg.progress,
                    machine=machine,
                )
            )
        except ClipDeployError as e:
            sections.append((model, None, notes + [f"bench failed: {e}"]))
            continue
        machine = machine or report["machine"]
        png = (report.get("files") or {}).get("png")
        if png:
            assets.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, assets / f"{model}.png")
        report["notes"] = notes + report["notes"]
        sections.append((model, report, []))
    atomic_write_text(cfg.output, render_page(cfg, device, machine or "this machine", sections, assets))
    return cfg.output


def render_page(
    cfg: MatrixConfig,
    device: str,
    machine: str,
    sections: list[tuple[str, dict[str, Any] | None, list[str]]],
    assets: Path,
) -> str:
    """The Markdown page: how it was made, a summary at batch 8, the targets, then one section per model."""
    reports = [r for _, r, _ in sections if r is not None]
    batch = 8 if 8 in cfg.batches else sorted(cfg.batches)[len(cfg.batches) // 2]
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by tools/bench_matrix.py; do not edit by hand. -->",
        "",
        f"Measured on **{machine}** ({device}), {datetime.now(timezone.utc).date().isoformat()}"
        + (f", with\n\n```\n{cfg.command}\n```" if cfg.command else "."),
        "",
        "Every contender ran the same inputs with the same thread count, in its own process; PyTorch is "
        "open_clip eager fp32 under `torch.inference_mode` with the artifact's own weights (random weights: "
        "speed does not depend on their values). Speed-ups are median latency against PyTorch fp32 at full "
        "text length, same tower and batch; `cos min` is the lowest embedding cosine against it. "
        f"{REPORT_DOC_HINT}",
        "",
    ]
    if reports:
        lines += [f"## Summary at batch {batch}", "", *summary_rows(reports, batch), ""]
    for model, report, notes in sections:
        if report is None:
            lines += [f"## {model}", "", *(f"- not measured: {n}" for n in notes), ""]
            continue
        rel = (assets / f"{model}.png").relative_to(cfg.output.parent).as_posix()
        plot = rel if (assets / f"{model}.png").is_file() else None
        lines += [markdown(report, heading_level=2, plot=plot), ""]
    schema = schema_doc().replace("::", ":", 1)
    head, _, rest = schema.partition("\n\n")
    body, _, timing = rest.partition("\n\nTiming:")
    lines += ["## Report schema", "", head, "", "```", textwrap.dedent(body), "```", "", "Timing:" + timing, ""]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip() + "\n"


def build_matrix_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python tools/bench_matrix.py",
        description="Benchmark several models (exported with random weights into --work-dir when missing) and "
        "write docs/benchmarks.md.",
    )
    parser.add_argument(
        "--work-dir", default="artifacts/bench-matrix", help="artifacts and reports (default: artifacts/bench-matrix)"
    )
    parser.add_argument(
        "-o", "--output", default="docs/benchmarks.md", help="page to write (default: docs/benchmarks.md)"
    )
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"default: {','.join(DEFAULT_MODELS)}")
    parser.add_argument("--precisions", help="default: fp32,int8 on CPU; fp32,fp16,int8,int8-fp16 on GPU")
    # The same options as `clipdeploy bench`, from the same fields; the timing defaults are the matrix's.
    options.add_dataclass_options(parser, BenchConfig, ["batches", "threads", "device", "machine", "progress"])
    options.add_dataclass_options(parser, TimingConfig, ["iters", "warmup", "max_seconds"], base=MATRIX_TIMING)
    parser.add_argument("--no-quantize", action="store_true", help="measure only the variants already made")
    parser.add_argument(
        "--calib-images", nargs="+", metavar="PATH", help="real images for clipdeploy quantize (folders or .tar shards)"
    )
    parser.add_argument("--quantize-args", default="", help="more `clipdeploy quantize` options, quoted")
    parser.add_argument("--build-args", default="", help="more `clipdeploy build` options, quoted")
    return parser


def config_from_matrix_args(args: argparse.Namespace, argv: list[str]) -> MatrixConfig:
    bench = options.config_from_args(BenchConfig, args, artifact=Path(args.work_dir))
    models = options.csv()("--models", args.models)
    return MatrixConfig(
        work_dir=Path(args.work_dir),
        output=Path(args.output),
        models=models,
        precisions=options.csv()("--precisions", args.precisions) if args.precisions else None,
        batches=bench.batches,
        timing=options.config_from_args(TimingConfig, args, base=MATRIX_TIMING),
        threads=bench.threads,
        device=bench.device,
        quantize=not args.no_quantize,
        quantize_args=(
            *(["--calib-images", *args.calib_images] if args.calib_images else []),
            *shlex.split(args.quantize_args),
        ),
        build_args=tuple(shlex.split(args.build_args)),
        machine=bench.machine,
        progress=bench.progress,
        command=" ".join(["python tools/bench_matrix.py", *map(shlex.quote, argv)]),
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_matrix_parser().parse_args(argv)
    try:
        cfg = config_from_matrix_args(args, argv)
        progress.configure(cfg.progress)  # bars on a terminal, as `clipdeploy bench` draws them
        path = run_matrix(cfg)
    except ClipDeployError as e:
        print(f"matrix: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
