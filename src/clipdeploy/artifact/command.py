"""`clipdeploy inspect`: print a readable summary of an artifact's manifest. Imports nothing heavy."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from clipdeploy.artifact.view import ArtifactView, ModelFacts, TensorSpec


def _shape(t: TensorSpec) -> str:
    return f"{t.name} {t.dtype} [{', '.join(str(d) for d in t.shape)}]"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def missing_files(view: ArtifactView) -> list[str]:
    """The files the runtime would open that are not there: variants, their external data, tokenizer files."""
    listed: list[str] = []
    for v in view.variants:
        listed += [v.file, *v.external_data]
    listed += list(view.files)
    listed += list((view.tokenizer.get("files") or {}).values())
    # read_manifest has confined every path to the artifact, so joining them here is safe.
    return [rel for rel in dict.fromkeys(listed) if not (view.root / rel).is_file()]


def _weights(model: ModelFacts) -> str:
    if model.pretrained:
        return f"pretrained {model.pretrained}"
    if model.checkpoint_sha256:
        return f"checkpoint {model.checkpoint} (sha256 {model.checkpoint_sha256[:16]}…)"
    return f"random weights (seed {model.random_init_seed})"


def format_manifest(view: ArtifactView, missing: tuple[str, ...] | list[str] = ()) -> str:
    # The preprocess and tokenizer entries are the runtime's own configs (PreprocessConfig, load_tokenizer): their
    # fields are read as those name them. Validation records are each stage's free-form report.
    model, pp, tok = view.model, view.preprocess, view.tokenizer
    height, width = view.image_size
    bias = "none" if model.logit_bias is None else f"{model.logit_bias:.4g}"
    lines = [
        f"{model.name}  [{model.family or '?'}]  {_weights(model)}",
        f"  schema {view.schema_version}, made {view.created or '?'} by clipdeploy {view.tools.get('clipdeploy', '?')}",
        f"  embed dim {model.embed_dim}, logit scale {model.logit_scale:.4g}, logit bias {bias}",
        f"  preprocess {height}x{width} {pp['interpolation']} resize={pp['resize_mode']} "
        f"mean={tuple(round(x, 4) for x in pp['mean'])} std={tuple(round(x, 4) for x in pp['std'])}",
        f"  tokenizer {tok['kind']}, context length {view.context_length}",
        "towers:",
    ]
    for tower, t in view.towers.items():
        lines.append(f"  {tower:5s} {_shape(t.inputs[0])} -> {_shape(t.outputs[0])}")
    lines.append("variants:")
    lines.append(f"  {'tower':5s} {'precision':9s} {'format':8s} {'size':>9s}  {'min cos':>9s}  {'max abs err':>11s}  gate  file")
    for v in view.variants:
        val = v.validation
        cos = f"{val['min_cosine']:.7f}" if "min_cosine" in val else "-"
        err = f"{val['max_abs_err']:.2e}" if "max_abs_err" in val else "-"
        gate = "pass" if v.accepted else "FAIL"
        lines.append(
            f"  {v.tower:5s} {v.precision:9s} {v.format:8s} {_size(v.extra.get('bytes', 0)):>9s}  {cos:>9s}  "
            f"{err:>11s}  {gate:4s}  {v.file}{'  MISSING' if v.file in missing else ''}"
        )
    export = view.validation("export")
    if export:
        # Every key optional (the schema checks only types here): print what the record has.
        diff = (export.get("preprocess") or {}).get("max_abs_diff")
        lines.append(
            f"export check: vs {export.get('reference', '?')} on {len(export.get('images') or [])} images / "
            f"{export.get('prompts', '?')} prompts at batch {', '.join(map(str, export.get('batches') or []))}; "
            f"runtime preprocessing max diff {'?' if diff is None else f'{diff:.1e}'}, "
            f"tokenizer mismatches {(export.get('tokenizer') or {}).get('mismatched', '?')}"
        )
    lines.append("tools: " + ", ".join(f"{k} {v}" for k, v in view.tools.items()))
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    view = ArtifactView.read(args.artifact)
    missing = missing_files(view)
    if args.json:
        json.dump(dict(view.raw), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_manifest(view, missing))
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
