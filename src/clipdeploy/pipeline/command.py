"""`clipdeploy run CONFIG.yaml`: parse, load the config, run, print the table. Imports nothing heavy."""

from __future__ import annotations

import argparse
from typing import Any

from clipdeploy.artifact.manifest import atomic_write_text
from clipdeploy.options import add_dataclass_options, config_from_args
from clipdeploy.pipeline.config import load_config
from clipdeploy.pipeline.runner import RunOptions, run_pipeline
from clipdeploy.pipeline.summary import table


def cmd_run(args: argparse.Namespace) -> int:
    import json
    import sys

    options = config_from_args(RunOptions, args)
    options.check()
    config = load_config(args.config, output=args.output)
    summary = run_pipeline(config, options)
    print(table(summary))
    if args.json:
        from pathlib import Path

        # Atomic, and makes missing parent directories, like every other output.
        atomic_write_text(Path(args.json), json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0 if summary["ok"] else 1


def add_run(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="export, quantize, build, validate and benchmark every model in a YAML file, incrementally",
        description="Run the pipeline described by a YAML file (defaults plus one entry per model): export, "
        "quantize, build, validate and bench. Each stage's outputs are keyed by a hash of its inputs (weights, "
        "config values, calibration data, tool versions, GPU and TensorRT version), so a re-run skips what is "
        "current and says so. One model failing does not stop the others. Stages that cannot run here "
        "(build and validate without TensorRT or a GPU) are skipped with the reason. Prints a summary table, "
        "writes OUTPUT/summary.json, and exits 1 if anything failed.",
    )
    p.add_argument("config", help="pipeline YAML file, e.g. configs/quickstart.yaml")
    p.add_argument("-o", "--output", metavar="DIR", help="output root (default: the file's `output:`)")
    add_dataclass_options(p, RunOptions, ["force", "only", "fail_fast", "models"])
    p.add_argument("--json", metavar="FILE", help="also write the summary JSON here")
    p.set_defaults(func=cmd_run)
