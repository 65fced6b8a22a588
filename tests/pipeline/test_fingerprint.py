"""What goes into a stage key, and how a change is named."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.support.pipeline_fakes import IMAGES

from clipdeploy.pipeline.fingerprint import changed, config_values, image_sources_digest, key_of, path_digest


def test_changed_names_each_input_and_tool():
    old = {"samples": 4, "tools": {"onnx": "1.16", "numpy": "2.0"}, "seed": 0}
    assert changed(None, old) == []
    assert changed(old, {**old, "samples": 5}) == ["samples"]
    assert changed(old, {**old, "tools": {"onnx": "1.17", "numpy": "2.0"}}) == ["tools.onnx"]
    assert changed(old, {**old, "depth": None}) == ["depth"]  # a new input counts even when it is null
    assert key_of(old) != key_of({**old, "depth": None})
    assert key_of({"a": 1, "b": 2}) == key_of({"b": 2, "a": 1})


def test_paths_count_by_content(tmp_path):
    from clipdeploy.quantize.config import QuantizeConfig

    captions = tmp_path / "captions.txt"
    captions.write_text("a cat\n")
    cfg = QuantizeConfig(artifact=tmp_path / "art", precision="int8", calib_texts=captions)
    first = config_values(cfg, exclude=("artifact",))
    assert first["calib_texts"] == path_digest(captions) and "artifact" not in first
    moved = tmp_path / "moved.txt"
    shutil.copyfile(captions, moved)
    assert (
        config_values(QuantizeConfig(artifact=tmp_path, precision="int8", calib_texts=moved))["calib_texts"]
        == first["calib_texts"]
    )
    captions.write_text("a dog\n")
    assert config_values(cfg)["calib_texts"] != first["calib_texts"]
    assert path_digest(tmp_path / "nope").startswith("missing:")
    assert path_digest(tmp_path).startswith("dir:")


def test_calibration_fingerprint_follows_content_and_order(tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    for p in sorted(IMAGES.glob("*.jpg"))[:4]:
        shutil.copyfile(p, calib / p.name)
    first = image_sources_digest([calib])
    assert first["images"] == 4 and first == image_sources_digest([calib])
    (calib / "notes.txt").write_text("not an image")  # not read by quantize, so not counted
    assert image_sources_digest([calib]) == first
    names = sorted(p.name for p in calib.glob("*.jpg"))
    (calib / names[0]).rename(calib / ("z" + names[0]))  # the seeded split sees another order
    assert image_sources_digest([calib]) != first
    tar_src = Path(tmp_path / "shard")
    shutil.make_archive(str(tar_src), "tar", calib)
    assert image_sources_digest([tmp_path / "shard.tar"])["images"] == 4
