"""embed-dataset on a local Ray cluster: the same rows as local mode; a killed actor is retried, no loss, no dups."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from clipdeploy.bulk import ray_runner
from clipdeploy.bulk.ray_runner import ShardEmbedder
from tests.bulk.test_embed_dataset import rows, run

ray = pytest.importorskip("ray", reason="the Ray runner needs ray[data] (pip install 'clipdeploy[ray]')")
pytest.importorskip("ray.data", reason="the Ray runner needs ray[data]")


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


class DiesOnce(ShardEmbedder):
    """Exits its process on its first shard, once per run (a marker file says it already died)."""

    def __call__(self, batch):
        marker = Path(self.job.out).parent / "died"
        if not marker.exists():
            marker.write_text("x")
            os._exit(1)
        return super().__call__(batch)


def test_ray_gives_the_local_rows_and_survives_a_killed_actor(ray_cluster, tiny_art, dataset, tmp_path, monkeypatch):
    """One Ray run in which an actor dies on its first shard: its rows must still equal local mode's, each
    once. (A separate run without the kill proved nothing this one does not, and cost ~12 s.)"""
    run(tiny_art, dataset, tmp_path / "local")
    want = rows(tmp_path / "local")
    real = ray_runner.run_ray
    monkeypatch.setattr(ray_runner, "run_ray", lambda *a, **k: real(*a, **k, udf=DiesOnce))
    killed = tmp_path / "killed" / "out"
    assert run(tiny_art, dataset, killed, "--ray", "--workers", "2") == 1
    assert (killed.parent / "died").exists()  # an actor did die mid-run
    assert json.loads((killed / "_manifest.json").read_text())["runner"] == "ray"
    got = rows(killed)  # rows() fails on a key seen twice
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k][0], want[k][0]) for k in want)
