"""`quantize --keep-node`: a node named from elsewhere (Polygraphy's `debug precision`, an earlier run's
recovery list) stays unquantized from the first build on, is recorded, and a name that is no node of
either tower is refused before anything is written."""

from __future__ import annotations

import shutil

import pytest

onnx = pytest.importorskip("onnx")

from clipdeploy.cli import main  # noqa: E402
from clipdeploy.errors import UsageError  # noqa: E402
from clipdeploy.artifact.manifest import read_manifest  # noqa: E402
from clipdeploy.quantize import int8  # noqa: E402
from clipdeploy.quantize.config import QuantizeConfig  # noqa: E402
from clipdeploy.quantize.stage import quantize  # noqa: E402

from tests.support import synthetic  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("keep-data")
    synthetic.write_dataset(root / "images", 100, seed=5)
    (root / "captions.txt").write_text("\n".join(f"a photo of thing {i}" for i in range(100)))
    return root


def _fed_by_dequantize(model, name: str) -> bool:
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    (node,) = [n for n in model.graph.node if n.name == name]
    return any(producers.get(i) == "DequantizeLinear" for i in node.input)


def _cfg(art, data, **kw) -> QuantizeConfig:
    return QuantizeConfig(artifact=art, precision="int8", calib_images=[data / "images"],
                          calib_texts=data / "captions.txt", samples=40, holdout=40, threads=1, **kw)


def test_a_named_node_stays_unquantized_and_is_recorded(micro_artifact, data, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(micro_artifact.path, art)
    prepared = tmp_path / "image.prepared.onnx"
    int8.prepare(art / "image.fp32.onnx", prepared)
    names = int8.quantizable_nodes(onnx.load(str(prepared)))
    keep, other = names[len(names) // 2], names[0]
    quantize(_cfg(art, data, keep_nodes=[keep]))
    manifest = read_manifest(art)
    (entry,) = [v for v in manifest["variants"] if v["precision"] == "int8" and v["tower"] == "image"]
    model = onnx.load(str(art / entry["file"]), load_external_data=False)
    assert not _fed_by_dequantize(model, keep)
    assert _fed_by_dequantize(model, other)  # the rest is still int8
    assert manifest["validation"]["quantize"]["int8"]["kept_by_request"] == {"image": [keep]}


def test_an_unknown_node_is_refused_in_one_line_and_nothing_is_written(micro_artifact, data, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(micro_artifact.path, art)
    before = read_manifest(art)
    with pytest.raises(UsageError, match=r"--keep-node 'no_such_node' is not a MatMul/Gemm/Conv node"):
        quantize(_cfg(art, data, keep_nodes=["no_such_node"]))
    assert read_manifest(art) == before
    assert sorted(p.name for p in art.glob(".*")) == []
    code = main(["quantize", str(art), "--precision", "fp16", "--keep-node", "x",
                 "--calib-images", str(data / "images")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--keep-node applies to calibrated precisions" in err[0]
