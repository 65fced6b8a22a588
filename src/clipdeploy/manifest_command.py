"""`clipdeploy inspect`: print a readable summary of an artifact's manifest. Imports nothing heavy."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from clipdeploy.manifest import read_manifest


def _shape(t: dict[str, Any]) -> str:
    return f"{t['name']} {t['dtype']} [{', '.join(str(d) for d in t['shape'])}]"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def format_manifest(m: dict[str, Any]) -> str:
    model = m["model"]
    if model.get("pretrained"):
        weights = f"pretrained {model['pretrained']}"
    elif model.get("checkpoint_sha256"):
        weights = f"checkpoint {model.get('checkpoint')} (sha256 {model['checkpoint_sha256'][:16]}…)"
    else:
        weights = f"random weights (seed {model.get('random_init_seed')})"
    pp, tok = m["preprocess"], m["tokenizer"]
    size = pp["size"] if isinstance(pp["size"], list) else [pp["size"], pp["size"]]  # the schema allows both
    bias = "none" if model.get("logit_bias") is None else f"{model['logit_bias']:.4g}"
    lines = [
        f"{model['name']}  [{model.get('family', '?')}]  {weights}",
        f"  schema {m['schema_version']}, made {m.get('created', '?')} by clipdeploy {m.get('tools', {}).get('clipdeploy', '?')}",
        f"  embed dim {model['embed_dim']}, logit scale {model['logit_scale']:.4g}, logit bias {bias}",
        f"  preprocess {size[0]}x{size[1]} {pp['interpolation']} resize={pp['resize_mode']} "
        f"mean={tuple(round(x, 4) for x in pp['mean'])} std={tuple(round(x, 4) for x in pp['std'])}",
        f"  tokenizer {tok['kind']}, context length {tok.get('context_length')}",
        "towers:",
    ]
    for tower, t in m["towers"].items():
        lines.append(f"  {tower:5s} {_shape(t['inputs'][0])} -> {_shape(t['outputs'][0])}")
    lines.append("variants:")
    lines.append(f"  {'tower':5s} {'precision':9s} {'format':8s} {'size':>9s}  {'min cos':>9s}  {'max abs err':>11s}  gate  file")
    for v in m["variants"]:
        val = v.get("validation") or {}
        cos = f"{val['min_cosine']:.7f}" if "min_cosine" in val else "-"
        err = f"{val['max_abs_err']:.2e}" if "max_abs_err" in val else "-"
        gate = "pass" if val.get("passed") else "FAIL"
        lines.append(
            f"  {v['tower']:5s} {v['precision']:9s} {v['format']:8s} {_size(v.get('bytes', 0)):>9s}  {cos:>9s}  "
            f"{err:>11s}  {gate:4s}  {v['file']}"
        )
    export = m.get("validation", {}).get("export")
    if export:
        # Every key optional (the schema checks only types here): print what the record has.
        diff = (export.get("preprocess") or {}).get("max_abs_diff")
        lines.append(
            f"export check: vs {export.get('reference', '?')} on {len(export.get('images') or [])} images / "
            f"{export.get('prompts', '?')} prompts at batch {', '.join(map(str, export.get('batches') or []))}; "
            f"runtime preprocessing max diff {'?' if diff is None else f'{diff:.1e}'}, "
            f"tokenizer mismatches {(export.get('tokenizer') or {}).get('mismatched', '?')}"
        )
    tools = m.get("tools", {})
    lines.append("tools: " + ", ".join(f"{k} {v}" for k, v in tools.items()))
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.artifact)
    if args.json:
        json.dump(manifest, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_manifest(manifest))
    return 0


def add_inspect(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="summarize an artifact's manifest",
        description="Print a readable summary of an artifact: model, towers, variants and their validation figures.",
    )
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.set_defaults(func=cmd_inspect)
