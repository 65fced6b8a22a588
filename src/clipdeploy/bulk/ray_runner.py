"""Ray Data runner: shard ids -> map_batches over an actor pool (each actor loads the artifact once).

Each actor call writes its shard through our atomic per-shard writer, so a retried task (Ray restarts a
dead actor and retries its task) rewrites the same file or finds it done: nothing lost, nothing twice.
Ray does placement, retries and back-pressure; there is no scheduler here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from clipdeploy.bulk.sources import Item
from clipdeploy.bulk.worker import Job, open_session, run_shard
from clipdeploy.deps import require
from clipdeploy.runtime.backends import registry


class ShardEmbedder:
    """Ray Data class UDF: opens the session in its constructor, embeds one shard per row it receives."""

    def __init__(self, job: Job, shards: Any) -> None:
        self.job = job
        self.shards = shards if isinstance(shards, dict) else require("ray", "ray").get(shards)
        self.session = open_session(job)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[int]]:
        done = [run_shard(self.session, self.job, int(i), self.shards[int(i)]) for i in batch["index"]]
        return {k: [d[k] for d in done] for k in ("index", "rows", "errors", "skipped")}


def connect(address: str | None) -> None:
    """Join ``address`` (``auto`` or ``ray://...``/``host:port``), or start a local Ray if none is running."""
    ray = require("ray", "ray")
    if not ray.is_initialized():
        ray.init(address=address or None, ignore_reinit_error=True, log_to_driver=False)


def run_ray(
    job: Job, shards: list[tuple[int, list[Item]]], workers: int, address: str | None = None, udf: type = ShardEmbedder
) -> Iterator[dict[str, int]]:
    ray = require("ray", "ray")
    require("ray.data", "ray")
    connect(address)
    if not shards:
        return
    ref = ray.put(dict(shards))
    gpu = job.backend in registry.needs_gpu()  # the backends that run on a GPU only
    ds = ray.data.from_items([{"index": i} for i, _ in shards], override_num_blocks=len(shards))
    ds = ds.map_batches(
        udf,
        fn_constructor_args=(job, ref),
        batch_size=1,
        concurrency=max(1, workers),
        num_gpus=1 if gpu else None,
        num_cpus=None if gpu else 1,
        # A dead actor is restarted and its shard retried; the atomic writer makes that safe.
        max_restarts=-1,
        max_task_retries=-1,
    )
    for row in ds.iter_rows():
        yield dict(row)
