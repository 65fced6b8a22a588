"""Plan items into output shards: shard ``i`` is a fixed function of the sorted item list and --shard-size."""

from __future__ import annotations

import hashlib
import json

from clipdeploy.bulk.sources import Item


def plan(items: list[Item], shard_size: int) -> list[list[Item]]:
    """Consecutive runs of ``shard_size`` sorted items; the same inputs give the same shards on every run."""
    ordered = sorted(items)
    return [ordered[s : s + shard_size] for s in range(0, len(ordered), shard_size)]


def plan_digest(items: list[Item], shard_size: int) -> str:
    """What a re-run must match to reuse finished shards: the item keys, their sources, the shard size."""
    h = hashlib.sha256(json.dumps({"shard_size": shard_size}).encode())
    for item in sorted(items):
        h.update(json.dumps([item.source, item.key]).encode() + b"\n")
    return h.hexdigest()


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"
