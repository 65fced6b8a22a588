"""`clipdeploy triton DIR... -o REPO`: parse, build a TritonConfig, write the repository, print. Nothing heavy."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from clipdeploy.options import add_dataclass_options, config_from_args
from clipdeploy.triton.readme import release_line
from clipdeploy.triton.config import TritonConfig
from clipdeploy.triton.repository import build_repository


def cmd_triton(args: argparse.Namespace) -> int:
    import sys

    cfg = config_from_args(
        TritonConfig, args, artifacts=[Path(a) for a in args.artifacts], output=Path(args.output)
    )
    summary = build_repository(cfg)
    count = sum(len(a["models"]) + len(a["ensembles"]) for a in summary["artifacts"])
    print(f"wrote {count} models to {summary['path']}")
    for art in summary["artifacts"]:
        for e in art["ensembles"]:
            mark = "  (default)" if e.get("default") else ""
            print(f"  {e['name']:40s} {e['input']:5s} -> EMBEDDING via {e['model']}{mark}")
    print(release_line(summary.get("tensorrt") or {})[0])
    print(f"start it: see {summary['path']}/README.md")
    for n in summary.get("notes") or []:
        print(f"note: {n}")
    for w in summary["warnings"]:
        print(f"clipdeploy: warning: {w}", file=sys.stderr)
    return 0


def add_triton(sub: Any) -> None:
    p = sub.add_parser(
        "triton",
        help="write a Triton Inference Server model repository for artifacts",
        description="Write a Triton model repository: one model per tower variant (tensorrt_plan for engines, "
        "onnxruntime_onnx for ONNX) with dynamic batching and instance groups, Python-backend models that run "
        "clipdeploy's own preprocessing and tokenizer, and ensembles that take raw image bytes or strings and "
        "return normalized embeddings. Warns when the engines' TensorRT version does not match the Triton release.",
    )
    p.add_argument("artifacts", nargs="+", metavar="DIR", help="artifact directories")
    p.add_argument("-o", "--output", required=True, metavar="REPO", help="model repository to write")
    add_dataclass_options(
        p,
        TritonConfig,
        [
            "formats", "precisions", "names", "onnx_device", "server_has_vnni", "onnx_max_batch_size", "instances",
            "python_instances",
            "max_queue_delay_us", "tensorrt_version", "triton_release", "triton_tensorrt", "force",
        ],
    )  # fmt: skip
    p.set_defaults(func=cmd_triton)
