"""`clipdeploy build` and `clipdeploy validate`: parse, call the API, print. Nothing heavy at import."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from clipdeploy import precisions
from clipdeploy.errors import UsageError
from clipdeploy.manifest import TOWERS


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def _figures(record: dict[str, Any]) -> str:
    if "skipped" in record:
        return f"skipped: {record['skipped']}"
    gate = "pass" if record.get("passed") else "FAIL"
    return (
        f"min cosine {record['min_cosine']:.6f}, max abs err {record['max_abs_err']:.2e} "
        f"({record['abs_err_rel']:.1e} of max) at batch {', '.join(record['batches'])}: {gate}"
    )


# ---- build --------------------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace) -> Any:
    from clipdeploy.engines.config import BuildConfig, parse_range, parse_size

    shapes = {}
    for item in args.shape or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--shape {item!r} is not NAME=MIN:OPT:MAX, e.g. --shape sequence=1:32:77")
        shapes[name] = parse_range(value)
    if args.seq_len:
        shapes["sequence"] = parse_range(args.seq_len)
    return BuildConfig(
        artifact=Path(args.artifact),
        precision=args.precision,
        towers=tuple(args.tower or ()),
        batch=parse_range(args.batch),
        shapes=shapes,
        workspace=parse_size(args.workspace) if args.workspace else None,
        opt_level=args.opt_level,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
        hardware_compat=args.hardware_compat,
        version_compat=args.version_compat,
        tf32=not args.no_tf32,
        device=args.device,
        validate=not args.no_validate,
    )


def cmd_build(args: argparse.Namespace) -> int:
    from clipdeploy.engines.builder import build_engines

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
    p.add_argument("--precision", default=precisions.REFERENCE, choices=precisions.names(),
                   help=f"ONNX variant to compile (default: {precisions.REFERENCE})")
    p.add_argument("--tower", action="append", choices=TOWERS, help="build only this tower (repeatable; default: all)")
    p.add_argument("--batch", default="1:8:64", metavar="MIN:OPT:MAX", help="batch profile (default: 1:8:64)")
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
    p.add_argument("--workspace", metavar="SIZE", help="workspace memory limit, e.g. 4GiB (default: TensorRT's)")
    p.add_argument(
        "--opt-level",
        type=int,
        default=3,
        choices=range(6),
        metavar="0-5",
        help="builder optimization level (default: 3)",
    )
    p.add_argument("--timing-cache", metavar="FILE", help="timing cache to load and merge into (created if missing)")
    p.add_argument(
        "--hardware-compat",
        default="none",
        choices=("none", "same-compute-capability", "ampere-plus"),
        help="build a plan that runs on other GPUs too (slower); default: this GPU's compute capability only",
    )
    p.add_argument(
        "--version-compat",
        action="store_true",
        help="build a plan that later TensorRT versions of the same major can load; it embeds host code, "
        "so loading it needs engine_host_code_allowed=True",
    )
    p.add_argument("--no-tf32", action="store_true", help="keep fp32 layers off TF32 tensor cores")
    p.add_argument(
        "--device", type=_non_negative_int, default=0, metavar="N", help="CUDA device to build on (default: 0)"
    )
    p.add_argument("--no-validate", action="store_true", help="skip the comparison with the ONNX source")
    p.set_defaults(func=cmd_build)


# ---- validate -----------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    from clipdeploy.engines.engine_validate import validate_engines

    report = validate_engines(
        Path(args.artifact), device=args.device, precision=args.precision, engine_host_code_allowed=args.allow_host_code
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
    p.add_argument("--device", type=_non_negative_int, default=0, metavar="N", help="CUDA device (default: 0)")
    p.add_argument(
        "--allow-host-code", action="store_true", help="load version-compatible plans, which embed host code"
    )
    p.set_defaults(func=cmd_validate)
