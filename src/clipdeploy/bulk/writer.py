"""Output directory: one parquet file per shard, written atomically; the run's identity; errors; manifest.json.

A shard's errors travel inside its parquet file (schema metadata), so a shard and its errors appear together
or not at all; errors.jsonl and manifest.json are assembled from the finished shards at the end of a run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clipdeploy.bulk.shards import shard_name
from clipdeploy.deps import require
from clipdeploy.errors import UsageError
from clipdeploy.artifact.manifest import atomic_write_bytes, atomic_write_text
from clipdeploy.artifact.staging import clean_stale_writes

IDENTITY = "_embed-dataset.json"  # "_": parquet readers of OUT (pyarrow, pandas) skip it
ERRORS = "_errors.jsonl"
MANIFEST = "_manifest.json"
_ERRORS_KEY = b"clipdeploy.errors"


def claim_output(out: Path, identity: dict[str, Any]) -> None:
    """Record which artifact, variant and plan fill ``out``; refuse a directory another run filled."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {str(out)!r} is a file; give a directory for the parquet shards")
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_writes(out)  # temporaries of a killed run
    marker = out / IDENTITY
    if marker.exists():
        seen = json.loads(marker.read_text(encoding="utf-8"))
        for field_name, what in (("artifact_sha256", "artifact"), ("variant", "variant"), ("plan_sha256", "item list or --shard-size")):
            if seen.get(field_name) != identity[field_name]:
                raise UsageError(
                    f"-o {str(out)!r} holds embeddings of another {what} ({seen.get(field_name)!r}, this run: "
                    f"{identity[field_name]!r}); give a new output directory, or the same inputs to resume"
                )
        return
    if any(p.name.endswith(".parquet") for p in out.iterdir()):
        raise UsageError(f"-o {str(out)!r} holds parquet files embed-dataset did not record; give a new directory")
    atomic_write_text(marker, json.dumps(identity, indent=2) + "\n")


def is_done(out: Path, index: int) -> bool:
    return (out / shard_name(index)).exists()


def write_shard(out: Path, index: int, rows: dict[str, list[Any]], dim: int, errors: list[dict[str, str]]) -> None:
    """Write shard ``index`` under a temporary name and rename it into place once complete."""
    pa = require("pyarrow", "bulk")
    pq = require("pyarrow.parquet", "bulk")
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("source", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
            ("caption", pa.string()),
        ],
        metadata={_ERRORS_KEY: json.dumps(errors).encode()},
    )
    table = pa.Table.from_pydict(rows, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(out / shard_name(index), sink.getvalue())


def finish(out: Path, n_shards: int, summary: dict[str, Any]) -> dict[str, Any]:
    """Gather every shard's counts and errors into errors.jsonl and manifest.json (both written atomically)."""
    pq = require("pyarrow.parquet", "bulk")
    rows, errors = 0, []
    for i in range(n_shards):
        meta = pq.read_metadata(out / shard_name(i))
        rows += meta.num_rows
        errors += json.loads(meta.schema.to_arrow_schema().metadata[_ERRORS_KEY])
    atomic_write_text(out / ERRORS, "".join(json.dumps(e) + "\n" for e in errors))
    manifest = {**summary, "shards": n_shards, "rows": rows, "errors": len(errors)}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest
