"""`clipdeploy` subcommands. Thin: parse, call the API, print.

Errors print one line (no traceback unless --verbose) and exit 2 for usage and input errors, 1 for
failed checks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipdeploy import __version__, deps, progress
from clipdeploy.errors import AccuracyError, ClipDeployError, InputError, UsageError
from clipdeploy.runtime.backends import registry as backends


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
    if args.output:
        _check_embed_output(Path(args.output))  # before the model loads: a bad -o fails at once
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
        _write_embed_output(Path(args.output), arrays, result)
    else:
        for tower, emb in arrays.items():
            result[tower]["embeddings"] = np.round(emb, 7).tolist()
    json.dump(result, sys.stdout, indent=None if not args.output else 2)
    sys.stdout.write("\n")
    return 0


# What `embed -o DIR` writes. DIR holds one run's set: a new run replaces the whole set at once.
EMBED_FILES = ("image.npy", "text.npy", "embed.json")


def _check_embed_output(out: Path) -> None:
    """-o names a directory that is new, empty, or an earlier `embed -o`'s (only EMBED_FILES in it)."""
    from clipdeploy.staging import clean_beside

    if out.exists() and not out.is_dir():
        raise UsageError(
            f"-o {str(out)!r} is an existing file; -o names a directory for {', '.join(EMBED_FILES)}; "
            "give a new or empty directory"
        )
    target = out.resolve()
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        raise UsageError(
            f"-o {str(out)!r} is the current directory or holds it; embed replaces DIR as a whole, "
            "so give it a subdirectory, e.g. -o embeddings"
        )
    clean_beside(target)  # what a killed embed left (a half-swapped earlier set comes back)
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in EMBED_FILES)
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise UsageError(
                f"-o {str(out)!r} holds files embed did not write ({shown}); embed replaces the directory's "
                "whole contents, so give it a new or empty directory, or one an earlier `embed -o` wrote"
            )


def _write_embed_output(out: Path, arrays: dict[str, Any], result: dict[str, Any]) -> None:
    """Write the new set beside DIR, then swap it in: no file of an earlier run survives beside it."""
    import numpy as np

    from clipdeploy.manifest import swap_directory
    from clipdeploy.staging import ensure_parent, output_temporaries, reserved

    _check_embed_output(out)  # again: the directory may have changed while the model ran
    target = out.resolve()
    ensure_parent(target)
    with reserved(target.parent, output_temporaries(target)[0]) as work:
        for tower, emb in arrays.items():
            np.save(work / f"{tower}.npy", emb)
            result[tower]["file"] = str(out / f"{tower}.npy")
            result[tower]["shape"] = list(emb.shape)
        (work / "embed.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        swap_directory(work, target)


def add_embed(sub: Any) -> None:
    p = sub.add_parser(
        "embed",
        help="embed images and strings with an artifact",
        description="Embed images and/or strings with an exported artifact, without torch. Prints JSON; with "
        "-o DIR writes DIR/image.npy, DIR/text.npy and DIR/embed.json (what was embedded, with which variant) "
        "instead of the numbers. DIR is created with its parents; if it exists it must be empty or hold only "
        "an earlier embed's files, which the new set replaces as a whole (a text.npy from an earlier run does "
        "not survive an image-only run); other files make embed refuse, so it never deletes yours. With both "
        "images and texts it also prints the model's image-text probabilities.",
    )
    p.add_argument("artifact", help="artifact directory made by `clipdeploy export`")
    p.add_argument("--image", nargs="+", metavar="PATH", help="image files")
    p.add_argument("--text", nargs="*", metavar="STR", help="strings")
    p.add_argument(
        "-o", "--output", metavar="DIR", help="write .npy files to this directory instead of printing numbers; "
        "an earlier embed's files there are replaced as a set"
    )
    p.add_argument("--backend", default=backends.AUTO, choices=backends.choices())
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
    _add_output_options(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from clipdeploy.benchmarks.command import add_bench
    from clipdeploy.engines.command import add_build, add_validate
    from clipdeploy.export.coverage import add_coverage
    from clipdeploy.pipeline.command import add_run
    from clipdeploy.precision.command import add_quantize
    from clipdeploy.triton.command import add_triton

    for add in (
        add_export, add_quantize, add_build, add_validate, add_embed, add_inspect, add_models, add_bench, add_run,
        add_triton, add_coverage,
    ):
        add(sub)
    for command in sub.choices.values():  # also after the command: `clipdeploy export ... --quiet`
        _add_output_options(command, default=argparse.SUPPRESS)
    return parser


def _add_output_options(parser: argparse.ArgumentParser, default: Any) -> None:
    # SUPPRESS on the subcommands, so an option given only before the command is not reset after it.
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default,
        help="log clipdeploy's steps (not other libraries' INFO) and show full tracebacks",
    )  # fmt: skip
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=default,
        help="no progress display (it is shown only when stderr is a terminal)",
    )  # fmt: skip


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


def _setup_output(*, verbose: bool, quiet: bool) -> None:
    """Progress on a terminal unless --quiet; INFO logs for clipdeploy's own loggers only with --verbose."""
    progress.configure(not quiet)
    if not progress.active():
        # huggingface_hub reads this when imported (later, lazily): no download bars where we show none.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, progress.LogHandler)]:
        root.removeHandler(h)  # main() called again in one process: one handler, not two
    handler = progress.LogHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    # open_clip logs on the root logger and onnxscript/onnx_ir/torch.onnx on their own, at INFO by
    # the dozen: third-party loggers stay at WARNING even with --verbose (ERROR without it).
    root.setLevel(logging.WARNING if verbose else logging.ERROR)
    logging.getLogger("clipdeploy").setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        import warnings

        warnings.filterwarnings("ignore")
    else:
        logging.captureWarnings(True)  # through the handler above, so a warning does not tear a bar


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    deps.command = f"clipdeploy {args.command}"  # so a missing optional library is reported for this command
    _setup_output(verbose=args.verbose, quiet=args.quiet)
    try:
        return int(args.func(args))
    except ClipDeployError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"clipdeploy: error: {e}", file=sys.stderr)
        if isinstance(e, AccuracyError) and e.report:
            _print_report(e.report)
        return e.exit_code
    except PermissionError as e:
        # A file this user may not read or write, where no stage expected one: still one line.
        if args.verbose:
            traceback.print_exc()
        where = e.filename or "a file"
        print(
            f"clipdeploy: error: permission denied on {str(where)!r} ({e.strerror or e}); it belongs to another "
            "user or its mode forbids this: fix its permissions (chmod) or run as its owner",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("clipdeploy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
