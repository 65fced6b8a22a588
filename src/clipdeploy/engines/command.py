"""`clipdeploy build` and `clipdeploy validate`: parse, call the API, print. Nothing heavy at import."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from clipdeploy import options, precisions
from clipdeploy.engines.builder import build_engines
from clipdeploy.engines.config import BuildConfig, parse_range
from clipdeploy.engines.engine_validate import validate_engines
from clipdeploy.errors import UsageError
from clipdeploy.options import add_dataclass_options, cuda_index

_DEFAULT_DEVICE: int = next(f.default for f in fields(BuildConfig) if f.name == "device")  # type: ignore[assignment]


def _figures(record: dict[str, Any]) -> str:
    if "skipped" in record:
        return f"skipped: {record['skipped']}"
    gate = "pass" if record.get("passed") else "FAIL"
    return (
        f"min cosine {record['min_cosine']:.6f}, max abs err {record['max_abs_err']:.2e} "
        f"({record['abs_err_rel']:.1e} of max) at batch {', '.join(record['batches'])}: {gate}"
    )


# ---- build --------------------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    shapes = {}
    for item in args.shape or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--shape {item!r} is not NAME=MIN:OPT:MAX, e.g. --shape sequence=1:32:77")
        shapes[name] = parse_range(value)
    if args.seq_len:
        shapes["sequence"] = parse_range(args.seq_len)
    return options.config_from_args(BuildConfig, args, artifact=Path(args.artifact), shapes=shapes)


def cmd_build(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    for e in build_engines(cfg):
        print(
            f"built {e['tower']:5s} {e['precision']} -> {e['file']} "
            f"({e['bytes'] / 1e6:.1f} MB, {e['build_seconds']:.0f}s) "
            f"on {e['gpu']} (compute {e['compute_capability']}), TensorRT {e['tensorrt_version']}"
        )
        if e.get("validation"):
            print(f"  vs {e['source']}: {_figures(e['validation'])}")
    return 0


def add_build(sub: Any) -> None:
    p = sub.add_parser(
        "build",
        help="compile an artifact's ONNX variant into TensorRT engines",
        description="Compile the ONNX variant of one precision of each tower into a strongly typed TensorRT engine "
        "for this GPU, record it in the manifest, and check it against its ONNX source. Needs TensorRT 10.13+ "
        "or 11 and an NVIDIA GPU: pip install 'clipdeploy[tensorrt]' (TensorRT 11, CUDA 13) or "
        "'clipdeploy[tensorrt10]' (TensorRT 10, CUDA 12).",
    )
    p.add_argument("artifact", help="artifact directory made by `clipdeploy export`")
    add_dataclass_options(p, BuildConfig, ["precision", "towers", "batch"])
    p.add_argument(
        "--seq-len",
        metavar="MIN:OPT:MAX",
        help="sequence-length profile of a dynamic-length text tower "
        "(default: 1:32:context length); same as --shape sequence=...",
    )
    p.add_argument(
        "--shape",
        action="append",
        metavar="AXIS=MIN:OPT:MAX",
        help="profile of any other named dynamic axis (repeatable)",
    )
    add_dataclass_options(
        p,
        BuildConfig,
        ["workspace", "opt_level", "timing_cache", "hardware_compat", "version_compat", "tf32", "device", "validate"],
    )
    p.set_defaults(func=cmd_build)


# ---- validate -----------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    device = cuda_index("--device", args.device) if args.device is not None else _DEFAULT_DEVICE
    report = validate_engines(
        Path(args.artifact), device=device, precision=args.precision, engine_host_code_allowed=args.allow_host_code
    )
    for file, record in report.items():
        print(f"{file}: {_figures(record)}")
    return 0


def add_validate(sub: Any) -> None:
    p = sub.add_parser(
        "validate",
        help="compare an artifact's TensorRT engines with their ONNX sources on this GPU",
        description="Run every TensorRT engine that fits this GPU and TensorRT version, and its ONNX source on ONNX "
        "Runtime CPU, on the bundled images and prompts; record cosine and abs-error figures in the manifest. "
        "Exits 1 when an engine is outside its precision's tolerance.",
    )
    p.add_argument("artifact", help="artifact directory with engines made by `clipdeploy build`")
    p.add_argument("--precision", choices=precisions.names(), help="validate only engines of this precision")
    add_dataclass_options(p, BuildConfig, ["device"])  # the same --device as build
    p.add_argument(
        "--allow-host-code", action="store_true", help="load version-compatible plans, which embed host code"
    )
    p.set_defaults(func=cmd_validate)
