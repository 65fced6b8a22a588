"""`clipdeploy quantize`: argument parsing and printing only; the work is in stage.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from clipdeploy import precisions
from clipdeploy.errors import AccuracyError
from clipdeploy.options import add_dataclass_options, config_from_args
from clipdeploy.quantize.config import QuantizeConfig
from clipdeploy.quantize.stage import quantize

THREADS_HELP = "ONNX Runtime intra-op threads for calibration and the gate"


def cmd_quantize(args: argparse.Namespace) -> int:
    cfg = config_from_args(QuantizeConfig, args, artifact=Path(args.artifact))
    try:
        report = quantize(cfg)
    except AccuracyError as e:
        # The full figures (worst samples included) on stderr, then the one-line error; the manifest keeps them.
        print(format_report(cfg.precision, e.report), file=sys.stderr)
        raise AccuracyError(str(e)) from None
    print(format_report(cfg.precision, report))
    return 0


def format_report(precision: str, report: dict[str, Any]) -> str:
    lines = [f"{precision}: gate {'passed' if report.get('passed') else 'FAILED'} in {report.get('seconds', 0):.0f}s"]
    for tower in ("image", "text"):
        if tower in report:
            r = report[tower]
            lines.append(f"  {tower:5s} cosine min {r['min_cosine']:.5f}  p1 {r['p1_cosine']:.5f}  "
                         f"p5 {r['p5_cosine']:.5f}  mean {r['mean_cosine']:.5f}  on {r['samples']} held-out samples")
            worst = ", ".join(f"{w['sample']} {w['cosine']:.4f}" for w in r.get("worst", []))
            lines.append(f"        worst: {worst}")
    if "top1_agreement" in report:
        note = "" if report.get("top1_enforced") else "  (recorded, not enforced: random weights)"
        lines.append(f"  top-1 agreement with fp32 {report['top1_agreement']:.4f} over {report['top1_prompts']} "
                     f"prompts{note}")
    rec = report.get("recovery")
    if rec and "kept_in_higher_precision" in rec:
        for tower, nodes in rec["kept_in_higher_precision"].items():
            speed = rec["speed_cost_batch8"][tower]["slowdown"]
            names = ", ".join(n["module"] or n["node"] for n in nodes)
            lines.append(f"  recovery kept {len(nodes)} {tower} node(s) unquantized ({names}); "
                         f"{speed:.2f}x the plain int8 latency at batch 8")
    elif rec:
        lines.append(f"  recovery: {rec.get('exhausted')}")
    for failure in report.get("failures", []):
        lines.append(f"  FAILED: {failure}")
    return "\n".join(lines)


def add_quantize(sub: Any) -> None:
    p = sub.add_parser(
        "quantize",
        help=f"make {' / '.join(precisions.quantized())} variants, gated against {precisions.REFERENCE}",
        description="Make a reduced-precision variant of both towers in the ONNX graph (the form TensorRT 10 "
        "and 11 compile), calibrated on real data and gated against the fp32 reference on held-out data. "
        "A variant that misses its gate is not written, and the command fails. int8 first tries to recover "
        "by keeping its most sensitive nodes in higher precision, within a bound.",
    )
    p.add_argument("artifact", help="artifact directory made by `clipdeploy export`")
    add_dataclass_options(p, QuantizeConfig, ["precision"])
    add_dataclass_options(
        p.add_argument_group("data"),
        QuantizeConfig,
        ["calib_images", "calib_texts", "samples", "holdout", "min_samples", "seed", "method"],
    )
    add_dataclass_options(
        p.add_argument_group("gate"), QuantizeConfig, ["gate_prompts", "min_cosine", "min_mean_cosine", "min_top1"]
    )
    calibrated = ", ".join(n for n in precisions.quantized() if precisions.get(n).calibrated)
    add_dataclass_options(
        p.add_argument_group(f"recovery ({calibrated})"), QuantizeConfig,
        ["recover", "max_fp32_fraction", "max_rounds", "keep_nodes"],
    )
    add_dataclass_options(p.add_argument_group("fp8"), QuantizeConfig, ["fp8_patch_embedding"])
    add_dataclass_options(p, QuantizeConfig, ["threads", "force"], overrides={"threads": {"help": THREADS_HELP}})
    p.set_defaults(func=cmd_quantize)
