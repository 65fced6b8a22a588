"""`clipdeploy` subcommands. Thin: parse, call the API, print.

Errors print one line (no traceback unless --verbose) and exit 2 for usage and input errors, 1 for
failed checks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipdeploy import __version__, deps
from clipdeploy.errors import AccuracyError, ClipDeployError, InputError, UsageError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


# ---- export -------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from clipdeploy.export.exporter import ExportConfig, export_model

    cfg = ExportConfig(
        model=args.model,
        output=Path(args.output),
        pretrained=args.pretrained,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        model_config=Path(args.model_config) if args.model_config else None,
        opset=args.opset,
        force=args.force,
        seed=args.seed,
        tokenizer_dir=Path(args.tokenizer_dir) if args.tokenizer_dir else None,
    )
    manifest = export_model(cfg)
    report = manifest["validation"]["export"]
    print(f"exported {cfg.model} to {cfg.output} in {manifest.get('export_seconds', 0):.0f}s")
    for tower in manifest["towers"]:
        r = report[tower]
        print(
            f"  {tower:5s} min cosine {r['min_cosine']:.7f}  max abs err {r['max_abs_err']:.2e} "
            f"({r['abs_err_rel']:.1e} of max)  vs PyTorch at batch {', '.join(map(str, report['batches']))}"
        )
    missing = manifest["tokenizer"].get("missing")
    tok_note = (
        f"tokenizer MISSING ({missing.get('hf_tokenizer_name')}): encode_text will refuse; {missing.get('fix')}"
        if missing
        else f"tokenizer identical on {report['tokenizer']['texts'] - report['tokenizer']['mismatched']}"
        f"/{report['tokenizer']['texts']} texts"
    )
    print(f"  runtime preprocessing max diff {report['preprocess']['max_abs_diff']:.1e}; {tok_note}")
    text = manifest["towers"].get("text", {})
    if text.get("padding"):
        print(f"  text: {text.get('pooling')} pooling, padding {text['padding']} (context {text.get('context_length')})")
    if manifest["model"].get("random_init_seed") is not None:
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
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", metavar="TAG", help="open_clip pretrained tag, e.g. openai (downloads)")
    weights.add_argument("--checkpoint", metavar="FILE", help="local state_dict or .safetensors file (offline)")
    p.add_argument(
        "--model-config", metavar="FILE.json", help="open_clip-format architecture JSON, registered as MODEL"
    )
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 17 or higher (default: 18)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact at --output")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights (default: 0)")
    p.add_argument(
        "--tokenizer-dir",
        metavar="DIR",
        help="folder with the Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json) for models "
        "whose tokenizer open_clip fetches from the hub (SigLIP, CLIPA, roberta, mt5, nllb, ...); save it with "
        "AutoTokenizer.from_pretrained(NAME).save_pretrained(DIR)",
    )
    p.set_defaults(func=cmd_export)


# ---- embed --------------------------------------------------------------------------------------


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from clipdeploy.runtime.session import load

    if args.text == []:
        raise InputError("--text was given no strings; pass at least one")
    if not args.image and not args.text:
        raise UsageError("nothing to embed: pass --image PATH... and/or --text STR...")
    session = load(
        args.artifact,
        backend=args.backend,
        precision=args.precision,
        intra_op_num_threads=args.threads,
    )
    normalize = not args.no_normalize
    result: dict[str, Any] = {"model": session.model_name, "variants": session.precision, "backend": session.backend}
    arrays: dict[str, Any] = {}
    if args.image:
        arrays["image"] = session.encode_image(args.image, normalize=normalize)
        result["image"] = {"inputs": args.image}
    if args.text:
        arrays["text"] = session.encode_text(args.text, normalize=normalize)
        result["text"] = {"inputs": args.text}
    if "image" in arrays and "text" in arrays:
        result["similarity"] = {
            "kind": "sigmoid" if session.logit_bias is not None else "softmax over texts",
            "probs": np.round(session.similarity(arrays["image"], arrays["text"]), 6).tolist(),
        }
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        for tower, emb in arrays.items():
            np.save(out / f"{tower}.npy", emb)
            result[tower]["file"] = str(out / f"{tower}.npy")
            result[tower]["shape"] = list(emb.shape)
    else:
        for tower, emb in arrays.items():
            result[tower]["embeddings"] = np.round(emb, 7).tolist()
    json.dump(result, sys.stdout, indent=None if not args.output else 2)
    sys.stdout.write("\n")
    return 0


def add_embed(sub: Any) -> None:
    p = sub.add_parser(
        "embed",
        help="embed images and strings with an artifact",
        description="Embed images and/or strings with an exported artifact, without torch. Prints JSON; with "
        "-o DIR writes DIR/image.npy and DIR/text.npy instead of the numbers. With both images and texts "
        "it also prints the model's image-text probabilities.",
    )
    p.add_argument("artifact", help="artifact directory made by `clipdeploy export`")
    p.add_argument("--image", nargs="+", metavar="PATH", help="image files")
    p.add_argument("--text", nargs="*", metavar="STR", help="strings")
    p.add_argument("-o", "--output", metavar="DIR", help="write .npy files here instead of printing numbers")
    p.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt"))
    p.add_argument("--precision", help="variant to run (default: the fastest accepted one)")
    p.add_argument("--threads", type=_positive_int, help="ONNX Runtime intra-op threads")
    p.add_argument("--no-normalize", action="store_true", help="return raw, not L2-normalized, embeddings")
    p.set_defaults(func=cmd_embed)


# ---- inspect ------------------------------------------------------------------------------------


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
    bias = "none" if model.get("logit_bias") is None else f"{model['logit_bias']:.4g}"
    lines = [
        f"{model['name']}  [{model.get('family', '?')}]  {weights}",
        f"  schema {m['schema_version']}, made {m.get('created', '?')} by clipdeploy {m.get('tools', {}).get('clipdeploy', '?')}",
        f"  embed dim {model['embed_dim']}, logit scale {model['logit_scale']:.4g}, logit bias {bias}",
        f"  preprocess {pp['size'][0]}x{pp['size'][1]} {pp['interpolation']} resize={pp['resize_mode']} "
        f"mean={tuple(round(x, 4) for x in pp['mean'])} std={tuple(round(x, 4) for x in pp['std'])}",
        f"  tokenizer {tok['kind']}, context length {tok['context_length']}",
        "towers:",
    ]
    for tower, t in m["towers"].items():
        lines.append(f"  {tower:5s} {_shape(t['inputs'][0])} -> {_shape(t['outputs'][0])}")
    lines.append("variants:")
    lines.append(f"  {'tower':5s} {'precision':9s} {'format':8s} {'size':>9s}  {'min cos':>9s}  {'max abs err':>11s}  gate  file")
    for v in m["variants"]:
        val = v.get("validation", {})
        cos = f"{val['min_cosine']:.7f}" if "min_cosine" in val else "-"
        err = f"{val['max_abs_err']:.2e}" if "max_abs_err" in val else "-"
        gate = "pass" if val.get("passed") else "FAIL"
        lines.append(
            f"  {v['tower']:5s} {v['precision']:9s} {v['format']:8s} {_size(v.get('bytes', 0)):>9s}  {cos:>9s}  "
            f"{err:>11s}  {gate:4s}  {v['file']}"
        )
    export = m.get("validation", {}).get("export")
    if export:
        lines.append(
            f"export check: vs {export['reference']} on {len(export['images'])} images / {export['prompts']} prompts "
            f"at batch {', '.join(map(str, export['batches']))}; runtime preprocessing max diff "
            f"{export['preprocess']['max_abs_diff']:.1e}, tokenizer mismatches {export['tokenizer']['mismatched']}"
        )
    tools = m.get("tools", {})
    lines.append("tools: " + ", ".join(f"{k} {v}" for k, v in tools.items()))
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    from clipdeploy.manifest import read_manifest

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


# ---- models -------------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    from clipdeploy.export.loading import import_open_clip

    open_clip = import_open_clip()
    rows = [(name, open_clip.list_pretrained_tags_by_model(name)) for name in open_clip.list_models()]
    if args.filter:
        rows = [r for r in rows if args.filter.lower() in r[0].lower()]
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
    p.add_argument("filter", nargs="?", help="show only names containing this text")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)


# ---- main ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipdeploy",
        description="Deployment compiler for OpenCLIP models: validated ONNX, a torch-free runtime.",
    )
    parser.add_argument("--version", action="version", version=f"clipdeploy {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show progress logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from clipdeploy.benchmarks.command import add_bench
    from clipdeploy.build.command import add_build, add_validate
    from clipdeploy.export.coverage import add_coverage
    from clipdeploy.pipeline.command import add_run
    from clipdeploy.precision.command import add_quantize
    from clipdeploy.triton.command import add_triton

    for add in (
        add_export, add_quantize, add_build, add_validate, add_embed, add_inspect, add_models, add_bench, add_run,
        add_triton, add_coverage,
    ):
        add(sub)
    return parser


def _print_report(report: dict[str, Any]) -> None:
    """The figures behind a failed check, one line per tower or check."""
    for key, value in report.items():
        if isinstance(value, dict) and ("min_cosine" in value or "passed" in value):
            figures = ", ".join(
                f"{k}={v:.7g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in value.items()
                if isinstance(v, (int, float, bool, str))
            )
            print(f"  {key}: {figures}", file=sys.stderr)
        elif key == "top1_agreement":
            print(f"  top-1 agreement: {value:.4f}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    deps.command = f"clipdeploy {args.command}"  # so a missing optional library is reported for this command
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        import warnings

        # open_clip and torch log and warn on the root logger; our own messages stay visible.
        warnings.filterwarnings("ignore")
        logging.getLogger().setLevel(logging.ERROR)
        logging.getLogger("clipdeploy").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except ClipDeployError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"clipdeploy: error: {e}", file=sys.stderr)
        if isinstance(e, AccuracyError) and e.report:
            _print_report(e.report)
        return e.exit_code
    except KeyboardInterrupt:
        print("clipdeploy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
