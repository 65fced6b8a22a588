"""`clipdeploy export`: parse, build an ExportConfig, export, print. Imports nothing heavy."""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path
from typing import Any

from clipdeploy.artifact.view import ArtifactView
from clipdeploy.export.config import ExportConfig
from clipdeploy.export.exporter import export_model
from clipdeploy.export.loading import import_open_clip
from clipdeploy.options import add_dataclass_options, config_from_args


def cmd_export(args: argparse.Namespace) -> int:
    cfg = config_from_args(ExportConfig, args, model=args.model, output=Path(args.output))
    manifest = export_model(cfg)
    view = ArtifactView.of(cfg.output, manifest)
    report = view.validation("export")
    print(f"exported {cfg.model} to {cfg.output} in {manifest.get('export_seconds', 0):.0f}s")
    for tower in view.towers:
        r = report[tower]
        print(
            f"  {tower:5s} min cosine {r['min_cosine']:.7f}  max abs err {r['max_abs_err']:.2e} "
            f"({r['abs_err_rel']:.1e} of max)  vs PyTorch at batch {', '.join(map(str, report['batches']))}"
        )
    missing = view.tokenizer.get("missing")
    tok_note = (
        f"tokenizer MISSING ({missing.get('hf_tokenizer_name')}): encode_text will refuse; {missing.get('fix')}"
        if missing
        else f"tokenizer identical on {report['tokenizer']['texts'] - report['tokenizer']['mismatched']}"
        f"/{report['tokenizer']['texts']} texts"
    )
    print(f"  runtime preprocessing max diff {report['preprocess']['max_abs_diff']:.1e}; {tok_note}")
    text = view.towers.get("text")
    if text is not None and text.padding:
        print(f"  text: {text.pooling} pooling, padding {text.padding} (context {view.context_length})")
    if view.model.random_init_seed is not None:
        print("  note: random weights (no --pretrained or --checkpoint): the embeddings carry no meaning")
    return 0


def add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export an open_clip model's towers to validated ONNX",
        description="Build an open_clip model, export its image and text towers to fp32 ONNX, check them "
        "against PyTorch on ONNX Runtime CPU, and write an artifact directory. Without --pretrained or "
        "--checkpoint the weights are random (seeded), which works offline.",
    )
    p.add_argument("model", help="open_clip architecture, e.g. ViT-B-32 or RN50 (see `clipdeploy models`)")
    p.add_argument("-o", "--output", required=True, help="artifact directory to create")
    add_dataclass_options(p.add_mutually_exclusive_group(), ExportConfig, ["pretrained", "checkpoint"])
    add_dataclass_options(p, ExportConfig, ["model_config", "opset", "force", "seed", "tokenizer_dir"])
    p.set_defaults(func=cmd_export)


GLOB_CHARS = "*?["


def match_models(names: list[str], pattern: str | None) -> list[str]:
    """``names`` that ``pattern`` selects: a glob over the whole name when it has * ? or [, else a name prefix.

    Case-sensitive, as open_clip spells its names: ``ViT-B`` selects ViT-B-32 and ViT-B-16, not ViT-bigG-14.
    """
    if not pattern:
        return list(names)
    if any(c in pattern for c in GLOB_CHARS):
        return [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return [n for n in names if n.startswith(pattern)]


def cmd_models(args: argparse.Namespace) -> int:
    open_clip = import_open_clip()
    names = list(open_clip.list_models())
    chosen = match_models(names, args.filter)
    if args.filter and not chosen:
        # The same filter without regard to case, so that 'vit-b' finds what 'ViT-B' would.
        folded = match_models([n.lower() for n in names], args.filter.lower())
        close = [n for n in names if n.lower() in folded]
        hint = f"; names are case-sensitive: {', '.join(close[:5])}{' ...' if len(close) > 5 else ''}" if close else ""
        print(f"clipdeploy: no architecture matches {args.filter!r}{hint}", file=sys.stderr)
    rows = [(name, open_clip.list_pretrained_tags_by_model(name)) for name in chosen]
    if args.json:
        json.dump([{"model": n, "pretrained": t} for n, t in rows], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    width = max((len(n) for n, _ in rows), default=5)
    for name, tags in rows:
        print(f"{name:{width}s}  {', '.join(tags) if tags else '(no published weights)'}")
    print(f"{len(rows)} architectures (open_clip {getattr(open_clip, '__version__', '?')})")
    return 0


def add_models(sub: Any) -> None:
    p = sub.add_parser(
        "models",
        help="list open_clip architectures and their pretrained tags",
        description="List the architectures open_clip can build, with the pretrained tags for --pretrained.",
    )
    p.add_argument(
        "filter", nargs="?", metavar="PREFIX|GLOB",
        help="show only names starting with PREFIX (case-sensitive: 'ViT-B' lists ViT-B-32, not ViT-bigG-14), or, "
        "with * ? or [ ], names matching the glob as a whole ('*SigLIP*', 'RN50*')",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)
