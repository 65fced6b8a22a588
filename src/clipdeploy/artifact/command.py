"""`clipdeploy inspect`: print a readable summary of an artifact's manifest. Imports nothing heavy."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from clipdeploy.artifact.manifest import read_manifest


def _shape(t: dict[str, Any]) -> str:
    return f"{t['name']} {t['dtype']} [{', '.join(str(d) for d in t['shape'])}]"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def missing_files(root: Path, m: dict[str, Any]) -> list[str]:
    """The files the runtime would open that are not there: variants, their external data, tokenizer files."""
    listed: list[str] = []
    for v in m["variants"]:
        listed.append(v["file"])
        listed += [e["file"] if isinstance(e, dict) else e for e in v.get("external_data") or []]
    listed += list(m.get("files") or {})
    listed += list(((m.get("tokenizer") or {}).get("files") or {}).values())
    # read_manifest has confined every path to the artifact, so joining them here is safe.
    return [rel for rel in dict.fromkeys(listed) if not (root / rel).is_file()]


def format_manifest(m: dict[str, Any], missing: tuple[str, ...] | list[str] = ()) -> str:
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
            f"{err:>11s}  {gate:4s}  {v['file']}{'  MISSING' if v['file'] in missing else ''}"
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
    missing = missing_files(Path(args.artifact), manifest)
    if args.json:
        json.dump(manifest, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_manifest(manifest, missing))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        print(
            f"clipdeploy: error: {len(missing)} file(s) the manifest lists are missing from {args.artifact}: {shown}; "
            "restore them or re-export the model with --force",
            file=sys.stderr,
        )
        return 1  # a failed check, as a failed gate is: the artifact cannot be loaded as it stands
    return 0


def add_inspect(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="summarize an artifact's manifest",
        description="Print a readable summary of an artifact: model, towers, variants and their validation figures. "
        "Exits 1 when a file the manifest lists (a variant, its external data, a tokenizer file) is missing.",
    )
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.set_defaults(func=cmd_inspect)
