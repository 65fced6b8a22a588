"""Local runner: the shards in this process (--workers 1) or a pool of processes, each opening the session once.

Memory stays bounded: a worker holds one shard at a time, and tasks carry item lists, never pixels.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from typing import Any

from clipdeploy.bulk.sources import Item
from clipdeploy.bulk.worker import Job, open_session, run_shard

_session: Any = None
_job: Job | None = None


def _init(job: Job) -> None:
    global _session, _job
    _job, _session = job, open_session(job)


def _task(args: tuple[int, list[Item]]) -> dict[str, int]:
    assert _job is not None
    return run_shard(_session, _job, *args)


def run_local(job: Job, shards: list[tuple[int, list[Item]]], workers: int) -> Iterator[dict[str, int]]:
    """Yield each shard's counts as it finishes (any order)."""
    if workers <= 1:
        session = open_session(job)
        for index, items in shards:
            yield run_shard(session, job, index, items)
        return
    threads = job.threads or 1  # N processes share the cores: one inference thread each unless told
    job = Job(**{**job.__dict__, "threads": threads})
    ctx = multiprocessing.get_context("spawn")  # no forked copies of the parent's threads or locks
    with ctx.Pool(workers, initializer=_init, initargs=(job,)) as pool:
        yield from pool.imap_unordered(_task, shards, chunksize=1)


Runner = Callable[[Job, list[tuple[int, list[Item]]], int], Iterator[dict[str, int]]]
