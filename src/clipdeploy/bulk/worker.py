"""One shard's work, the same on every runner: read, decode (a thread ahead of inference), embed, write."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipdeploy.bulk.batch import TarCache, encode_prepared, prepare_batch, read_item
from clipdeploy.bulk.sources import Item
from clipdeploy.bulk.writer import is_done, write_shard
from clipdeploy.runtime.session import load


@dataclass(frozen=True)
class Job:
    artifact: str
    out: str
    backend: str = "auto"
    precision: str | None = None
    batch_size: int = 32
    texts: bool = False
    fast_decode: bool = False
    threads: int | None = None


def open_session(job: Job) -> Any:
    options = {} if job.threads is None else {"intra_op_num_threads": job.threads}
    return load(job.artifact, backend=job.backend, precision=job.precision, **options)


def run_shard(session: Any, job: Job, index: int, items: list[Item]) -> dict[str, int]:
    """Embed shard ``index`` and write it atomically; a finished shard is skipped (a retried task is safe)."""
    out = Path(job.out)
    if is_done(out, index):
        return {"index": index, "rows": 0, "errors": 0, "skipped": 1}
    rows: dict[str, list[Any]] = {"key": [], "source": [], "embedding": [], "caption": []}
    errors: list[dict[str, str]] = []
    tars = TarCache()
    batches = [items[s : s + job.batch_size] for s in range(0, len(items), job.batch_size)]

    def prepare(batch: list[Item]) -> tuple[Any, dict[int, str]]:
        data, unread = [], {}
        for i, item in enumerate(batch):
            try:
                data.append(read_item(item, tars))
            except Exception as e:  # an unreadable tar member is an item error, not a failed run
                unread[i] = f"{type(e).__name__}: {e}"
                data.append(b"")
        return prepare_batch(session, data, texts=job.texts, fast_decode=job.fast_decode), unread

    try:
        with ThreadPoolExecutor(1) as pool:
            ahead = pool.submit(prepare, batches[0]) if batches else None
            for b, batch in enumerate(batches):
                prepared, unread = ahead.result()
                ahead = pool.submit(prepare, batches[b + 1]) if b + 1 < len(batches) else None
                result = encode_prepared(session, prepared, texts=job.texts)
                for k, i in enumerate(result.ok):
                    rows["key"].append(batch[i].key)
                    rows["source"].append(batch[i].source)
                    rows["embedding"].append(result.embeddings[k].tolist())
                    rows["caption"].append(batch[i].caption)
                for i, reason in sorted({**result.errors, **unread}.items()):
                    errors.append({"source": batch[i].source, "key": batch[i].key, "reason": reason})
    finally:
        tars.close()
    write_shard(out, index, rows, session.embed_dim, errors)
    return {"index": index, "rows": len(rows["key"]), "errors": len(errors), "skipped": 0}
