"""`clipdeploy embed-dataset`: enumerate, plan shards, skip finished ones, run locally or on Ray, summarize."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from clipdeploy import progress
from clipdeploy.bulk.config import EmbedDatasetConfig
from clipdeploy.bulk.local import run_local
from clipdeploy.bulk.shards import plan, plan_digest
from clipdeploy.bulk.sources import enumerate_items
from clipdeploy.bulk.worker import Job, open_session
from clipdeploy.bulk.writer import ERRORS, claim_output, finish, is_done
from clipdeploy.deps import require
from clipdeploy.errors import UsageError
from clipdeploy.artifact.manifest import file_sha256
from clipdeploy.options import add_dataclass_options, config_from_args


def embed_dataset(args: argparse.Namespace, runner: Any = None) -> int:
    """The CLI entry: the exit code is 1 when more than --max-errors items could not be read, else 0."""
    cfg = config_from_args(
        EmbedDatasetConfig, args, artifact=Path(args.artifact), sources=list(args.sources),
        output=Path(args.output), ray=args.ray,
    )  # fmt: skip
    record = run_embed_dataset(cfg, runner)
    return 1 if record["errors"] > cfg.max_errors else 0


def run_embed_dataset(cfg: EmbedDatasetConfig, runner: Any = None) -> dict[str, Any]:
    """Embed ``cfg.sources`` into ``cfg.output`` (resuming a run there); returns the run's _manifest.json."""
    require("pyarrow", "bulk")  # before any work: the output is parquet
    cfg.check()
    artifact = cfg.artifact
    if not (artifact / "manifest.json").is_file():
        raise UsageError(f"{str(artifact)!r} is not an artifact directory (no manifest.json); pass one `export` made")
    items = enumerate_items(cfg.sources, texts=cfg.texts, column=cfg.column)
    shards = plan(items, cfg.shard_size)
    job = Job(
        str(artifact), str(cfg.output.resolve()), cfg.backend, cfg.precision, cfg.batch_size,
        cfg.texts, cfg.fast_decode, cfg.threads,
    )  # fmt: skip
    session = open_session(job)  # which variant runs, for the output's identity (and a bad artifact fails here)
    tower = "text" if cfg.texts else "image"
    variant = session.variants[tower]
    identity = {
        "artifact_sha256": file_sha256(artifact / "manifest.json"),
        "variant": f"{tower}.{variant.precision}.{variant.format}:{variant.sha256}",
        "plan_sha256": plan_digest(items, cfg.shard_size),
        "model": session.model_name,
    }
    out = Path(job.out)
    claim_output(out, identity)
    pending = [(i, s) for i, s in enumerate(shards) if not is_done(out, i)]
    del session
    start = time.perf_counter()
    todo = sum(len(s) for _, s in pending)
    if runner is None:
        if cfg.ray is not None:
            # here, not at the top: ray loads only with --ray
            from clipdeploy.bulk.ray_runner import run_ray

            address = None if cfg.ray == "local" else cfg.ray
            runner = lambda j, p, w: run_ray(j, p, w, address=address)  # noqa: E731
        else:
            runner = run_local
    sizes = dict(pending)
    if pending:  # a finished run does no model work at all
        with progress.counter(todo, "embedding", unit="item") as bar:
            for done in runner(job, pending, cfg.workers):
                bar.update(len(sizes[done["index"]]))
    seconds = time.perf_counter() - start
    record = finish(  # the output's own _manifest.json, not the artifact's manifest
        out, len(shards),
        # items = rows + errors over all shards; *_this_run: the shards this run did (the rest were done before).
        {**identity, "items": len(items), "items_this_run": todo, "shards_this_run": len(pending),
         "seconds": round(seconds, 3), "items_per_second": round(todo / seconds, 2) if seconds > 0 and todo else None,
         "runner": "ray" if cfg.ray is not None else f"local x{cfg.workers}"},
    )  # fmt: skip
    failed = record["errors"]
    print(
        f"{record['rows']} embeddings in {len(shards)} shards at {out}; {failed} unreadable item(s)"
        + (f" listed in {out / ERRORS}" if failed else ""),
        file=sys.stderr,
    )
    return record


DESCRIPTION = """\
Embed a whole dataset into OUT/part-NNNNN.parquet (key, source, embedding, caption), plus OUT/_errors.jsonl
(every item that could not be read, with the reason) and OUT/_manifest.json: items = rows (embedded) + errors
(unreadable) over all shards, items_this_run and shards_this_run (what this run did; a resumed run skips the
shards done before), seconds, items/s.
SOURCE: image folders (recursive), webdataset .tar shards, parquet/CSV files with a path column (relative
paths are relative to the table's folder); with --texts a text file (a caption a line) or a text column.
Globs and braces (shard-{000..099}.tar) expand. Each shard is written atomically: a re-run skips finished
shards and redoes the rest, so a killed run resumes with nothing lost or twice.

Local: clipdeploy embed-dataset ART images/ -o out --workers 4
       N processes here, each loading the artifact once; a progress line with items/s and ETA.
Ray:   clipdeploy embed-dataset ART 'shards/{000..999}.tar' -o /shared/out --ray auto --workers 16
       --ray alone starts a local Ray, --ray auto or --ray HOST:PORT joins a cluster; --workers actors
       (one GPU each for tensorrt/cuda); Ray retries a dead actor's shard. OUT must be storage every node
       sees. pip install 'clipdeploy[ray]'.

Exit code: 0 when at most --max-errors items (default 0) could not be read, 1 when more could not,
2 for bad usage or input (one line saying what to fix)."""


def add_embed_dataset(sub: Any) -> None:
    p = sub.add_parser(
        "embed-dataset",
        help="embed a whole dataset into sharded parquet, resumable, locally or on Ray",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION,
    )
    p.add_argument("artifact", help="artifact directory made by `clipdeploy export`")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="folders, .tar shards, parquet/CSV or text files")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="directory for the parquet shards")
    p.add_argument(
        "--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
        help="run on Ray Data: 'auto' or an address joins a cluster; no value starts a local Ray",
    )  # fmt: skip
    add_dataclass_options(
        p, EmbedDatasetConfig,
        ["texts", "column", "batch_size", "shard_size", "workers", "max_errors", "backend", "precision",
         "fast_decode", "threads"],
        overrides={"threads": {"help": "ONNX Runtime intra-op threads per worker", "default_text":
                               "the cores available with one worker, 1 each with more"}},
    )  # fmt: skip
    p.set_defaults(func=embed_dataset)
