"""`clipdeploy quantize`: argument parsing and printing only; the work is in stage.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from clipdeploy import precisions


def cmd_quantize(args: argparse.Namespace) -> int:
    from clipdeploy.errors import AccuracyError
    from clipdeploy.precision.stage import QuantizeConfig, quantize

    cfg = QuantizeConfig(
        artifact=Path(args.artifact),
        precision=args.precision,
        calib_images=[Path(p) for p in args.calib_images or []],
        calib_texts=Path(args.calib_texts) if args.calib_texts else None,
        method=args.method,
        samples=args.samples,
        holdout=args.holdout,
        min_samples=args.min_samples,
        seed=args.seed,
        gate_prompts=Path(args.gate_prompts) if args.gate_prompts else None,
        min_cosine=args.min_cosine,
        min_mean_cosine=args.min_mean_cosine,
        min_top1=args.min_top1,
        recover=not args.no_recover,
        max_fp32_fraction=args.max_fp32_fraction,
        max_rounds=args.max_rounds,
        threads=args.threads,
        force=args.force,
    )
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
        help="make fp16 / int8 / int8-fp16 variants, gated against fp32",
        description="Make a reduced-precision variant of both towers in the ONNX graph (the form TensorRT 10 "
        "and 11 compile), calibrated on real data and gated against the fp32 reference on held-out data. "
        "A variant that misses its gate is not written, and the command fails. int8 first tries to recover "
        "by keeping its most sensitive nodes in higher precision, within a bound.",
    )
    p.add_argument("artifact", help="artifact directory made by `clipdeploy export`")
    p.add_argument("--precision", required=True, choices=precisions.quantized(),
                   help="int8: Q/DQ with fp32 elsewhere (best on ONNX Runtime CPU); int8-fp16: Q/DQ with fp16 "
                   "elsewhere (best on TensorRT)")
    data = p.add_argument_group("data")
    data.add_argument("--calib-images", nargs="+", metavar="PATH", help="image folders (recursive) or .tar shards")
    data.add_argument("--calib-texts", metavar="FILE", help="captions, one per line (default: ImageNet classes "
                      "x open_clip's templates)")
    data.add_argument("--samples", type=int, default=300, help="calibration samples per tower (default: 300)")
    data.add_argument("--holdout", type=int, default=256,
                      help="held-out samples per tower for the gate, at least 32 (default: 256; data too short for "
                      "--samples plus --holdout is shared evenly between the two)")
    data.add_argument("--min-samples", type=int, default=32, help="fewest calibration samples accepted (default: 32)")
    data.add_argument("--seed", type=int, default=0, help="seed that picks the samples (default: 0)")
    data.add_argument("--method", default="minmax", choices=("minmax", "entropy", "percentile"),
                      help="int8 activation calibration (default: minmax)")
    g = p.add_argument_group("gate")
    g.add_argument("--gate-prompts", metavar="FILE", help="class prompts, one per line, for top-1 agreement "
                   "(default: ImageNet 'a photo of a {}.')")
    g.add_argument("--min-cosine", type=float, help="lowest cosine of any held-out sample, in (-1, 1] "
                   "(default: 0.999 for fp16, 0.95 for int8 and int8-fp16)")
    g.add_argument("--min-mean-cosine", type=float, help="lowest mean cosine (default: 0.99 for int8)")
    g.add_argument("--min-top1", type=float, help="lowest top-1 agreement, in [0, 1] (default: 0.95 for int8)")
    r = p.add_argument_group("recovery (int8)")
    r.add_argument("--no-recover", action="store_true", help="fail at once when int8 misses its gate")
    r.add_argument("--max-fp32-fraction", type=float, default=0.10,
                   help="most quantizable nodes recovery may keep unquantized (default: 0.10)")
    r.add_argument("--max-rounds", type=int, default=5, help="recovery rounds at most (default: 5)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    p.add_argument("--force", action="store_true", help="replace an existing variant of this precision")
    p.set_defaults(func=cmd_quantize)
