"""`clipdeploy triton DIR... -o REPO`: parse, build a TritonConfig, write the repository, print. Nothing heavy."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from clipdeploy import precisions


def cmd_triton(args: argparse.Namespace) -> int:
    import sys

    from clipdeploy.manifest import FORMATS
    from clipdeploy.triton.readme import release_line
    from clipdeploy.triton.repository import TritonConfig, build_repository

    cfg = TritonConfig(
        artifacts=[Path(a) for a in args.artifacts],
        output=Path(args.output),
        formats=tuple(dict.fromkeys(args.format)) if args.format else FORMATS,
        precisions=tuple(dict.fromkeys(args.precision or ())),
        names=tuple(args.name or ()),
        onnx_max_batch_size=args.onnx_max_batch_size,
        onnx_device=args.onnx_device,
        instances=args.instances,
        python_instances=args.python_instances,
        max_queue_delay_us=args.max_queue_delay_us,
        tensorrt_version=args.tensorrt_version,
        triton_release=args.triton_release,
        triton_tensorrt=args.triton_tensorrt,
        force=args.force,
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
    p.add_argument(
        "--format", action="append", choices=("onnx", "tensorrt"), help="serve only this format (repeatable)"
    )
    p.add_argument(
        "--precision",
        action="append",
        choices=precisions.names(),
        help="serve only this precision (repeatable; default: every accepted one)",
    )
    p.add_argument(
        "--name",
        action="append",
        metavar="NAME",
        help="model-name prefix, once per artifact in order (default: the directory name)",
    )
    p.add_argument(
        "--onnx-device", default="cpu", choices=("cpu", "gpu"), help="instance kind of ONNX models (default: cpu)"
    )
    p.add_argument(
        "--onnx-max-batch-size",
        type=int,
        default=64,
        metavar="N",
        help="max_batch_size of ONNX models (default: 64; engines take theirs from the profile)",
    )
    p.add_argument("--instances", type=int, default=1, metavar="N", help="instances of each tower model (default: 1)")
    p.add_argument(
        "--python-instances",
        type=int,
        default=2,
        metavar="N",
        help="CPU instances of each preprocess/tokenize/normalize model (default: 2)",
    )
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=100,
        metavar="US",
        help="dynamic batching queue delay in microseconds (default: 100)",
    )
    p.add_argument("--tensorrt-version", metavar="V", help="serve engines of this TensorRT version when several exist")
    p.add_argument(
        "--triton-release", metavar="YY.MM", help="the Triton release you will run; warns on a TensorRT mismatch"
    )
    p.add_argument(
        "--triton-tensorrt", metavar="V", help="that release's TensorRT version, if clipdeploy does not know it"
    )
    p.add_argument("--force", action="store_true", help="replace an existing repository written by this command")
    p.set_defaults(func=cmd_triton)
