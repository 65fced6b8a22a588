"""An ONNX file's own external-data locations are confined too: nothing outside the model's folder is
read (ONNX Runtime 1.18, within the declared floor, follows `../x.data` and symlinks out), and an
artifact's model reads only the side files its manifest lists and checksums."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import clipdeploy
from clipdeploy.errors import ArtifactError
from clipdeploy.artifact.manifest import file_sha256
from clipdeploy.artifact.external_data import check_locations, external_locations

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.external_data_helper import _get_all_tensors  # noqa: E402


def _model(with_subgraph: bool = True) -> onnx.ModelProto:
    """y = x @ W + C, with W an initializer, C a Constant node's tensor, and an If whose branches hold tensors."""
    w = numpy_helper.from_array(np.full((4, 4), 2.0, np.float32), "W")
    const = helper.make_node("Constant", [], ["C"], value=numpy_helper.from_array(np.ones((1, 4), np.float32), "c"))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), const, helper.make_node("Add", ["xw", "C"], ["y"])]
    if with_subgraph:

        def branch(name: str, value: float) -> onnx.GraphProto:
            t = numpy_helper.from_array(np.full((1, 4), value, np.float32), f"{name}_t")
            return helper.make_graph(
                [helper.make_node("Constant", [], [f"{name}_out"], value=t)], name, [],
                [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1, 4])],
            )  # fmt: skip

        cond = numpy_helper.from_array(np.array(True), "cond")
        nodes.append(helper.make_node("If", ["cond"], ["z"], then_branch=branch("then", 1.0), else_branch=branch("else", 0.0)))
        inits = [w, cond]
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
                   helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])]  # fmt: skip
    else:
        inits = [w]
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def _save_external(model: onnx.ModelProto, path: Path, location: str, *, everything: bool = True) -> None:
    # everything=False: weights only, as the exporter does (shape constants must stay inline for ORT).
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0 if everything else 1024, convert_attribute=everything)  # fmt: skip


def _relocate(path: Path, location: str) -> None:
    """Point every external tensor of the ONNX file at ``location`` (the file is rewritten, the data not moved)."""
    model = onnx.load(str(path), load_external_data=False)
    for t in _get_all_tensors(model):
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(model, str(path))


def test_locations_match_onnx_own_reading(tmp_path):
    path = tmp_path / "m.onnx"
    _save_external(_model(), path, "m.onnx.data")
    model = onnx.load(str(path), load_external_data=False)
    want = [e.value for t in _get_all_tensors(model) for e in t.external_data if e.key == "location"]
    assert len(want) >= 5  # initializers, the Constant's attribute, both If branches
    assert external_locations(path) == want
    assert check_locations(path) == want  # beside the model: accepted


def test_a_model_without_external_data_has_none(micro_artifact):
    assert external_locations(micro_artifact.path / "image.fp32.onnx") == []


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_runner_refuses_data_outside_the_models_folder(how, tmp_path):
    from clipdeploy.runtime.backends.onnxruntime import OrtOptions, OrtRunner

    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "m.onnx"
    _save_external(_model(with_subgraph=False), path, "m.onnx.data")
    shutil.move(folder / "m.onnx.data", tmp_path / "outside.data")
    location = {"dotdot": "../outside.data", "absolute": str(tmp_path / "outside.data"), "symlink": "link.data"}[how]
    if how == "symlink":
        os.symlink(tmp_path / "outside.data", folder / "link.data")
    _relocate(path, location)
    with pytest.raises(ArtifactError, match="may read only files beside it") as err:
        OrtRunner(path, OrtOptions(providers=("CPUExecutionProvider",)))
    assert repr(location) in str(err.value) and "\n" not in str(err.value)


def test_malformed_onnx_is_one_line(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"\x3a\xff\xff")  # a field whose length varint is cut short
    with pytest.raises(ArtifactError, match="cannot load .* not a valid ONNX file"):
        external_locations(path)


@pytest.fixture
def unlisted(micro_artifact, tmp_path) -> Path:
    """The micro artifact whose image model reads weights from weights.data, a file its manifest does not list
    (the model's own sha256 is updated, so only the listing can catch it)."""
    root = Path(shutil.copytree(micro_artifact.path, tmp_path / "art"))
    model = onnx.load(str(root / "image.fp32.onnx"))
    _save_external(model, root / "image.fp32.onnx", "weights.data", everything=False)
    m = json.loads((root / "manifest.json").read_text())
    v = next(v for v in m["variants"] if v["file"] == "image.fp32.onnx")
    v["sha256"] = file_sha256(root / "image.fp32.onnx")
    (root / "manifest.json").write_text(json.dumps(m))
    return root


def test_load_refuses_external_data_the_manifest_does_not_list(unlisted):
    with pytest.raises(ArtifactError, match=r"reads external data from 'weights.data', which its manifest entry does not list"):
        clipdeploy.load(unlisted)


def test_load_accepts_it_once_listed(unlisted):
    m = json.loads((unlisted / "manifest.json").read_text())
    v = next(v for v in m["variants"] if v["file"] == "image.fp32.onnx")
    v["external_data"] = [{"file": "weights.data", "sha256": file_sha256(unlisted / "weights.data")}]
    m["files"].pop("weights.data", None)
    (unlisted / "manifest.json").write_text(json.dumps(m))
    assert clipdeploy.load(unlisted).encode_image(
        [Path(clipdeploy.__file__).parent / "data" / "images" / "coffee.jpg"]
    ).shape == (1, 64)


def test_triton_refuses_a_model_whose_data_it_would_leave_behind(unlisted, tmp_path):
    from clipdeploy.triton.config import TritonConfig
    from clipdeploy.triton.repository import build_repository

    out = tmp_path / "repo"
    with pytest.raises(ArtifactError, match="does not list"):
        build_repository(TritonConfig(artifacts=[unlisted], output=out))
    assert not out.exists()
