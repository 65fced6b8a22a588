"""ONNX files over 2 GB keep their weights in a side file: export, checksum and load, end to end.

The threshold is lowered so a micro model takes the same path a giant takes at full size.
"""

from __future__ import annotations

import numpy as np
import pytest

from clipdeploy.errors import ArtifactError
from clipdeploy.artifact.manifest import file_sha256, read_manifest
from clipdeploy.validation import cosine_rows

from tests.support.testdata import MICRO_CONFIG

pytest.importorskip("open_clip")
pytest.importorskip("torch")

from clipdeploy.export import onnx_export  # noqa: E402
from clipdeploy.export.config import ExportConfig  # noqa: E402
from clipdeploy.export.exporter import export_model  # noqa: E402


@pytest.fixture(scope="module")
def external_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("ext") / "art"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
        export_model(ExportConfig(model="micro-vit", output=out, model_config=MICRO_CONFIG, seed=4))
    return out


def test_weights_go_to_side_files_with_checksums(external_artifact):
    m = read_manifest(external_artifact)
    for v in m["variants"]:
        assert v["external_data"], f"{v['file']} has no external data"
        onnx_file = external_artifact / v["file"]
        for e in v["external_data"]:
            side = external_artifact / e["file"]
            assert side.is_file() and e["sha256"] == file_sha256(side)
            assert side.stat().st_size > onnx_file.stat().st_size  # the weights really moved out
        assert v["bytes"] == onnx_file.stat().st_size + sum((external_artifact / e["file"]).stat().st_size
                                                            for e in v["external_data"])
        assert v["validation"]["passed"]
    # The side files are variant files, not listed twice among the other files.
    assert not any(rel.endswith(".data") for rel in m["files"])


def test_loads_and_embeds(external_artifact, tmp_path):
    import clipdeploy

    session = clipdeploy.load(external_artifact, verify=True)
    txt = session.encode_text(["a cat", "a dog"])
    assert txt.shape == (2, 64) and np.isfinite(txt).all()
    ref = session.encode_tokens(session.tokenize(["a cat", "a dog"]))
    assert cosine_rows(txt, ref).min() >= 0.99999


def test_corrupt_side_file_fails_the_checksum(external_artifact, tmp_path):
    import shutil

    import clipdeploy

    copy = tmp_path / "copy"
    shutil.copytree(external_artifact, copy)
    m = read_manifest(copy)
    side = copy / m["variants"][0]["external_data"][0]["file"]
    data = bytearray(side.read_bytes())
    data[len(data) // 2] ^= 0xFF
    side.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        clipdeploy.load(copy, verify=True)
