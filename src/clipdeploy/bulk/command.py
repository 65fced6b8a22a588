"""`clipdeploy embed-dataset`: enumerate, plan shards, skip finished ones, run locally or on Ray, summarize."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from clipdeploy import progress
from clipdeploy.bulk.local import run_local
from clipdeploy.bulk.shards import plan, plan_digest
from clipdeploy.bulk.sources import enumerate_items
from clipdeploy.bulk.worker import Job, open_session
from clipdeploy.bulk.writer import ERRORS, claim_output, finish, is_done
from clipdeploy.deps import require
from clipdeploy.errors import UsageError
from clipdeploy.manifest import file_sha256
from clipdeploy.options import add_threads, threads_from_args
from clipdeploy.runtime.backends import registry as backends


def embed_dataset(args: argparse.Namespace, runner: Any = None) -> int:
    """Run the command; returns the exit code (0, or 1 when more than --max-errors items failed)."""
    require("pyarrow", "bulk")  # before any work: the output is parquet
    if args.batch_size < 1 or args.shard_size < 1 or args.workers < 1:
        raise UsageError("--batch-size, --shard-size and --workers take a positive integer")
    artifact = Path(args.artifact)
    if not (artifact / "manifest.json").is_file():
        raise UsageError(f"{str(artifact)!r} is not an artifact directory (no manifest.json); pass one `export` made")
    items = enumerate_items(args.source, texts=args.texts, column=args.column)
    shards = plan(items, args.shard_size)
    job = Job(
        str(artifact), str(Path(args.output).resolve()), args.backend, args.precision, args.batch_size,
        args.texts, args.fast_decode, threads_from_args(args),
    )  # fmt: skip
    session = open_session(job)  # which variant runs, for the output's identity (and a bad artifact fails here)
    tower = "text" if args.texts else "image"
    variant = session.variants[tower]
    identity = {
        "artifact_sha256": file_sha256(artifact / "manifest.json"),
        "variant": f"{tower}.{variant.precision}.{variant.format}:{variant.sha256}",
        "plan_sha256": plan_digest(items, args.shard_size),
        "model": session.model_name,
    }
    out = Path(job.out)
    claim_output(out, identity)
    pending = [(i, s) for i, s in enumerate(shards) if not is_done(out, i)]
    del session
    start = time.perf_counter()
    todo = sum(len(s) for _, s in pending)
    if runner is None:
        if args.ray is not None:
            # here, not at the top: ray loads only with --ray
            from clipdeploy.bulk.ray_runner import run_ray

            runner = lambda j, p, w: run_ray(j, p, w, address=None if args.ray == "local" else args.ray)  # noqa: E731
        else:
            runner = run_local
    sizes = dict(pending)
    if pending:  # a finished run does no model work at all
        with progress.counter(todo, "embedding", unit="item") as bar:
            for done in runner(job, pending, args.workers):
                bar.update(len(sizes[done["index"]]))
    seconds = time.perf_counter() - start
    manifest = finish(
        out, len(shards),
        {**identity, "items": len(items), "embedded_this_run": todo, "seconds": round(seconds, 3),
         "items_per_second": round(todo / seconds, 2) if seconds > 0 and todo else None,
         "runner": "ray" if args.ray is not None else f"local x{args.workers}"},
    )  # fmt: skip
    failed = manifest["errors"]
    print(
        f"{manifest['rows']} embeddings in {len(shards)} shards at {out}; {failed} unreadable item(s)"
        + (f" listed in {out / ERRORS}" if failed else ""),
        file=sys.stderr,
    )
    return 1 if failed > args.max_errors else 0


def add_embed_dataset(sub: Any) -> None:
    p = sub.add_parser(
        "embed-dataset",
        help="embed a whole dataset into sharded parquet, resumable, locally or on Ray",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Embed image folders, webdataset .tar shards (braces like shard-{000..099}.tar expand) or "
        "parquet/CSV path columns into OUT/part-NNNNN.parquet (key, source, embedding, caption), with "
        "OUT/_errors.jsonl and OUT/_manifest.json.\n"
        "Exactly once: each shard is written atomically; a re-run skips finished shards and redoes the rest.\n"
        "Local:  clipdeploy embed-dataset ART images/ -o out --workers 4   (processes on this machine)\n"
        "Ray:    clipdeploy embed-dataset ART 'shards/{000..999}.tar' -o out --ray auto   (join a cluster;\n"
        "        --ray alone starts a local one; GPU actors for the tensorrt/cuda backends). pip install "
        "'clipdeploy[ray]'.",
    )
    p.add_argument("artifact", help="artifact directory made by `clipdeploy export`")
    p.add_argument("source", nargs="+", help="image folders, .tar shards, parquet/CSV files (globs and braces ok)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="directory for the parquet shards")
    p.add_argument("--texts", action="store_true", help="embed text lines (a text file, or a parquet/CSV column)")
    p.add_argument("--column", help="the parquet/CSV column with paths (default: path) or texts (default: text)")
    p.add_argument("--batch-size", type=int, default=32, help="items per inference call (default: 32)")
    p.add_argument("--shard-size", type=int, default=10000, help="items per output shard (default: 10000)")
    p.add_argument("--workers", type=int, default=1, help="local processes, or Ray actors with --ray (default: 1)")
    p.add_argument(
        "--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
        help="run on Ray Data: 'auto' or an address joins a cluster; no value starts a local Ray",
    )  # fmt: skip
    p.add_argument(
        "--max-errors", type=int, default=0,
        help="unreadable items allowed before the exit code is 1 (default: 0; they are always listed)",
    )  # fmt: skip
    p.add_argument("--backend", default=backends.AUTO, choices=backends.choices())
    p.add_argument("--precision", help="variant to run (default: the fastest accepted one)")
    p.add_argument("--fast-decode", action="store_true", help="faster, approximate JPEG decoding (if supported)")
    add_threads(p)
    p.set_defaults(func=embed_dataset)
