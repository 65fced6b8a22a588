"""`clipdeploy build` and `clipdeploy validate`: parse, call the API, print. Nothing heavy at import."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from clipdeploy import options, precisions
from clipdeploy.engines.builder import build_engines
from clipdeploy.engines.config import BuildConfig, parse_range
from clipdeploy.engines.validate import compare_saved, validate_engines
from clipdeploy.errors import UsageError
from clipdeploy.options import add_dataclass_options, cuda_index

_DEFAULT_DEVICE: int = next(f.default for f in fields(BuildConfig) if f.name == "device")  # type: ignore[assignment]


def _figures(record: dict[str, Any]) -> str:
    if "skipped" in record:
        return f"skipped: {record['skipped']}"
    gate = "pass" if record.get("passed") else "FAIL"
    poly = [
        f"{out} max abs {r['max_abs_err']:.2e}, rel {r['max_rel_err']:.2e}"
        + (f" ({'within' if r['passed'] else 'OUTSIDE'} atol {r['atol']:.2e}, rtol {r['rtol']:.2e})"
           if r["atol"] is not None else " (measured, not gated)")
        for out, r in record.get("polygraphy", {}).items()
    ]  # fmt: skip
    return (
        f"min cosine {record['min_cosine']:.6f}, max abs err {record['max_abs_err']:.2e} "
        f"({record['abs_err_rel']:.1e} of max) at batch {', '.join(record['batches'])}"
        + (f"; Polygraphy: {'; '.join(poly)}" if poly else "")
        + f": {gate}"
    )


def parse_tolerances(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """--atol/--rtol [OUTPUT=]VALUE (repeatable) -> {"atol": {OUTPUT or "": value}, ...}."""
    out: dict[str, dict[str, float]] = {}
    for kind in ("atol", "rtol"):
        for item in getattr(args, kind) or []:
            name, sep, value = item.rpartition("=")
            try:
                v = float(value)
            except ValueError:
                v = float("nan")
            if (sep and not name) or not v >= 0:
                raise UsageError(f"--{kind} {item!r} is not [OUTPUT=]VALUE with VALUE >= 0, e.g. --{kind} 1e-3")
            out.setdefault(kind, {})[name] = v
    return out


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
    tolerances = parse_tolerances(args)
    if args.load_results is not None:
        if args.save_results is not None or args.precision is not None:
            raise UsageError("--load-results compares the saved engines as they are; drop --save-results and --precision")
        report = compare_saved(Path(args.artifact), Path(args.load_results), tolerances)
        for file, record in report.items():
            print(f"{file} (saved): {_figures(record)}")
        return 0
    device = cuda_index("--device", args.device) if args.device is not None else _DEFAULT_DEVICE
    report = validate_engines(
        Path(args.artifact),
        device=device,
        precision=args.precision,
        engine_host_code_allowed=args.allow_host_code,
        save_results=args.save_results,
        tolerances=tolerances,
    )
    for file, record in report.items():
        print(f"{file}: {_figures(record)}")
    return 0


def add_validate(sub: Any) -> None:
    p = sub.add_parser(
        "validate",
        help="compare an artifact's TensorRT engines with their ONNX sources on this GPU",
        description="Run every TensorRT engine that fits this GPU and TensorRT version, and its ONNX source on ONNX "
        "Runtime CPU, on the bundled images and prompts; record cosine and abs-error figures, and Polygraphy's "
        "per-output comparison, in the manifest. Exits 1 when an engine is outside its precision's tolerance. "
        "--save-results keeps the engines' inputs and outputs (Polygraphy RunResults JSON) so that "
        "--load-results can compare them later on any machine, without TensorRT or a GPU. "
        "Polygraphy comes with 'clipdeploy[tensorrt]'.",
    )
    p.add_argument("artifact", help="artifact directory with engines made by `clipdeploy build`")
    p.add_argument("--precision", choices=precisions.names(), help="validate only engines of this precision")
    add_dataclass_options(p, BuildConfig, ["device"])  # the same --device as build
    p.add_argument(
        "--allow-host-code", action="store_true", help="load version-compatible plans, which embed host code"
    )
    p.add_argument("--save-results", metavar="FILE", help="write the engines' inputs and outputs as Polygraphy RunResults JSON")
    p.add_argument(
        "--load-results",
        metavar="FILE",
        help="compare results saved by --save-results with ONNX Runtime here (no TensorRT or GPU needed)",
    )
    p.add_argument(
        "--atol",
        action="append",
        metavar="[OUTPUT=]VALUE",
        help="Polygraphy's absolute tolerance for OUTPUT (or every output); an element fails when it exceeds "
        "both atol and rtol (default: the precision's max abs error as a fraction of the largest reference "
        "value, rtol 0; int8 and fp8 are measured, not gated; repeatable)",
    )
    p.add_argument("--rtol", action="append", metavar="[OUTPUT=]VALUE", help="Polygraphy's relative tolerance, as --atol")
    p.set_defaults(func=cmd_validate)
