"""`clipdeploy embed`: parse, load an artifact with the runtime, embed, print or write. Nothing heavy at import."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from clipdeploy.errors import InputError, UsageError
from clipdeploy.artifact.manifest import swap_directory
from clipdeploy.options import add_threads, threads_from_args
from clipdeploy.runtime.backends import registry as backends
from clipdeploy.runtime.session import load
from clipdeploy.artifact.staging import check_writable, clean_beside, ensure_parent, output_temporaries, reserved


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

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
        intra_op_num_threads=threads_from_args(args),
    )
    normalize = not args.no_normalize
    result: dict[str, Any] = {"model": session.model_name, "variants": session.precision, "backend": session.backend}
    arrays: dict[str, Any] = {}
    if args.image:
        arrays["image"] = session.encode_image(args.image, normalize=normalize, fast_decode=args.fast_decode)
        result["image"] = {"inputs": args.image}
    if args.text:
        arrays["text"] = session.encode_text(args.text, normalize=normalize)
        result["text"] = {"inputs": args.text}
        cut = session.truncated(args.text)
        result["text"]["truncated"] = cut
        if cut:
            shown = ", ".join(f"#{i + 1}" for i in cut[:10]) + (f" and {len(cut) - 10} more" if len(cut) > 10 else "")
            print(
                f"clipdeploy: note: cut {len(cut)} of {len(args.text)} texts ({shown}) to the context length of "
                f"{session.context_length} tokens, as open_clip's tokenizer cuts them: only that many are embedded",
                file=sys.stderr,
            )
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
    check_writable(target.parent)  # before the model runs, not after
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
    p.add_argument(
        "--backend", default=backends.AUTO, choices=backends.choices(),
        help=f"what runs the towers: {backends.AUTO} (default: picks by the artifact and this machine; --verbose "
        f"says why) or one of {', '.join(backends.names())}",
    )
    p.add_argument("--precision", help="variant to run (default: the fastest accepted one)")
    add_threads(p)
    p.add_argument("--no-normalize", action="store_true", help="return raw, not L2-normalized, embeddings")
    p.add_argument(
        "--fast-decode", action="store_true", help="decode large JPEGs at 1/2, 1/4 or 1/8 scale (Pillow draft "
        "mode): faster, but not open_clip's exact pixels; off by default"
    )
    p.set_defaults(func=cmd_embed)
