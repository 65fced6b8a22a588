"""The benchmark matrix: several models, each across its precisions and batch sizes, into docs/benchmarks.md.

    python -m clipdeploy.benchmarks.matrix --work-dir artifacts/bench-matrix

For each model it exports an artifact into the work directory if there is none (random weights,
offline), makes the reduced-precision variants with `clipdeploy quantize` when the precision stage is
installed (and TensorRT engines with `clipdeploy build` on a GPU, when that stage is installed), runs
`clipdeploy bench` on it, and writes one Markdown page naming the machine, with every model's table
and plot. Nothing is estimated: a contender that could not run is listed with its reason.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clipdeploy import progress
from clipdeploy.benchmarks.bench import DEFAULT_BATCHES, BenchConfig, resolve_device, run_bench
from clipdeploy.benchmarks.contenders import has_module
from clipdeploy.benchmarks.harness import TimingConfig
from clipdeploy.benchmarks.report import REPORT_DOC_HINT, markdown, schema_doc, summary_rows
from clipdeploy.errors import ClipDeployError, UsageError
from clipdeploy.manifest import MANIFEST_NAME, atomic_write_text, read_manifest

DEFAULT_MODELS = ("ViT-B-32", "ViT-B-16", "RN50", "convnext_base", "ViT-L-14")
# What the matrix measures by default: what the runtime would pick on the device, plus fp32.
DEFAULT_PRECISIONS = {"cpu": ("fp32", "int8"), "cuda": ("fp32", "fp16", "int8", "int8-fp16")}


@dataclass
class MatrixConfig:
    """Everything the matrix takes."""

    work_dir: Path  # artifacts and per-model reports live here; reused between runs
    output: Path = Path("docs/benchmarks.md")  # the page to write; plots go beside it, in benchmarks/
    models: tuple[str, ...] = DEFAULT_MODELS  # open_clip architectures, exported with random weights
    precisions: tuple[str, ...] | None = None  # None: fp32 and int8 on CPU; fp32, fp16, int8, int8-fp16 on GPU
    batches: tuple[int, ...] = DEFAULT_BATCHES
    timing: TimingConfig = field(default_factory=lambda: TimingConfig(iters=20, warmup=3, max_seconds=30.0))
    threads: int | None = None  # None: the cores available
    device: str = "auto"
    quantize: bool = True  # make missing variants with `clipdeploy quantize` when it is installed
    quantize_args: tuple[str, ...] = ()  # extra arguments for `clipdeploy quantize`, e.g. --calib-images DIR
    build_args: tuple[str, ...] = ()  # extra arguments for `clipdeploy build`
    machine: str | None = None  # the machine's name on the page; None: CPU model, cores, memory, GPU
    progress: bool = True  # progress bars on stderr
    command: str = ""  # the command line that made the page, shown on it


def _clipdeploy(*args: str) -> tuple[int, str]:
    """Run a clipdeploy command in a fresh process; its exit code and last error line."""
    proc = subprocess.run([sys.executable, "-m", "clipdeploy.cli", *args], capture_output=True, text=True, check=False)
    sys.stderr.write(proc.stdout)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return proc.returncode, (lines[-1] if lines else "")


def prepare_artifact(
    cfg: MatrixConfig, model: str, device: str, precisions: tuple[str, ...]
) -> tuple[Path | None, list[str]]:
    """Export (if missing) and make the wanted variants (if the stages are installed); notes on what was not."""
    art = cfg.work_dir / model
    notes: list[str] = []
    if not (art / MANIFEST_NAME).is_file():
        progress.write(f"[{model}] exporting to {art} (random weights) ...")
        code, err = _clipdeploy("export", model, "-o", str(art), "--force")
        if code != 0:
            return None, [f"export failed: {err}"]
    have = {(v["format"], v["precision"]) for v in read_manifest(art)["variants"]}
    reduced = [p for p in precisions if p != "fp32" and ("onnx", p) not in have]
    if reduced and cfg.quantize:
        if not has_module("clipdeploy.precision"):
            notes.append(
                f"no {', '.join(reduced)} variants: the precision stage (`clipdeploy quantize`) is not installed here, "
                "so only fp32 was measured"
            )
        else:
            for p in reduced:
                progress.write(f"[{model}] clipdeploy quantize --precision {p} ...")
                code, err = _clipdeploy("quantize", str(art), "--precision", p, *cfg.quantize_args)
                if code != 0:
                    notes.append(f"`clipdeploy quantize --precision {p}` failed, so {p} was not measured: {err}")
    if device == "cuda" and cfg.quantize:
        have = {(v["format"], v["precision"]) for v in read_manifest(art)["variants"]}
        engines = [p for p in precisions if ("tensorrt", p) not in have and ("onnx", p) in have]
        if engines and not has_module("clipdeploy.engines"):
            notes.append("no TensorRT engines: the build stage (`clipdeploy build`) is not installed here")
        for p in engines if has_module("clipdeploy.engines") else []:
            progress.write(f"[{model}] clipdeploy build --precision {p} ...")
            code, err = _clipdeploy("build", str(art), "--precision", p, *cfg.build_args)
            if code != 0:
                notes.append(f"`clipdeploy build --precision {p}` failed, so its engine was not measured: {err}")
    return art, notes


def run_matrix(cfg: MatrixConfig) -> Path:
    """Run every model and write the page; returns its path."""
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    precisions = cfg.precisions or DEFAULT_PRECISIONS[device]
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
        "<!-- Generated by clipdeploy.benchmarks.matrix; do not edit by hand. -->",
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


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clipdeploy.benchmarks.matrix",
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
    parser.add_argument("--batch", default="1,8,32", help="batch sizes (default: 1,8,32)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per case at most (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per case (default: 3)")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="time budget per case (default: 30)")
    parser.add_argument("--threads", type=int, help="threads per contender (default: the cores available)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--machine", help="the machine's name on the page")
    parser.add_argument("--no-quantize", action="store_true", help="measure only the variants already made")
    parser.add_argument(
        "--calib-images", nargs="+", metavar="PATH", help="real images for clipdeploy quantize (folders or .tar shards)"
    )
    parser.add_argument("--quantize-args", default="", help="extra arguments for clipdeploy quantize, quoted")
    parser.add_argument("--build-args", default="", help="extra arguments for clipdeploy build, quoted")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        batches = tuple(int(b) for b in _csv(args.batch))
        if not batches or min(batches) < 1:
            raise ValueError
    except ValueError:
        print(f"matrix: error: --batch {args.batch!r} must be batch sizes of 1 or more, e.g. 1,8,32", file=sys.stderr)
        return 2
    try:
        cfg = MatrixConfig(
            work_dir=Path(args.work_dir),
            output=Path(args.output),
            models=_csv(args.models),
            precisions=_csv(args.precisions) if args.precisions else None,
            batches=batches,
            timing=TimingConfig(iters=args.iters, warmup=args.warmup, max_seconds=args.max_seconds),
            threads=args.threads,
            device=args.device,
            quantize=not args.no_quantize,
            quantize_args=(
                *(["--calib-images", *args.calib_images] if args.calib_images else []),
                *shlex.split(args.quantize_args),
            ),
            build_args=tuple(shlex.split(args.build_args)),
            machine=args.machine,
            progress=not args.no_progress,
            command=" ".join(
                ["python -m clipdeploy.benchmarks.matrix", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]
            ),
        )
        if not cfg.models:
            raise UsageError("--models is empty; pass e.g. ViT-B-32,RN50")
        path = run_matrix(cfg)
    except ClipDeployError as e:
        print(f"matrix: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
