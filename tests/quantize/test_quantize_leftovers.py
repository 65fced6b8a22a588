"""A killed quantize leaves its temporary (about the model's size) inside the artifact: the next
quantize removes it, and leaves a running one's alone."""

from __future__ import annotations

import fcntl
import shutil

import pytest

pytest.importorskip("onnx")

from clipdeploy.artifact.manifest import read_manifest  # noqa: E402
from clipdeploy.quantize.config import QuantizeConfig  # noqa: E402
from clipdeploy.quantize.stage import quantize  # noqa: E402

from tests.support import synthetic  # noqa: E402


def test_next_quantize_removes_a_dead_runs_temporary(micro_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(micro_artifact.path, art)
    synthetic.write_dataset(tmp_path / "images", 120, seed=3)
    (tmp_path / "captions.txt").write_text("\n".join(f"a photo of thing {i}" for i in range(120)))
    dead, live = art / ".quantize-deadbeef", art / ".quantize-0123abcd"
    for d in (dead, live):
        d.mkdir()
        (d / "image.fp16.onnx").write_bytes(b"\0" * 4096)
        (art / (d.name + ".lock")).write_text("pid 999999\n")
    with open(art / (live.name + ".lock")) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a quantize still running on this artifact
        quantize(QuantizeConfig(artifact=art, precision="fp16", calib_images=[tmp_path / "images"],
                                calib_texts=tmp_path / "captions.txt", samples=40, holdout=40, threads=1))
        assert not dead.exists() and not (art / (dead.name + ".lock")).exists()
        assert live.is_dir() and (art / (live.name + ".lock")).is_file()
    # Nothing of this run is left: only the running one's temporary and lock.
    assert sorted(p.name for p in art.glob(".*")) == [live.name, live.name + ".lock"]
    assert {v["precision"] for v in read_manifest(art)["variants"]} == {"fp32", "fp16"}
