"""The precision stage on convolutional image towers: a micro ModifiedResNet and a micro ConvNeXt
(timm's convnext_atto), calibrated and gated on crops of real photographs.

Random weights: the cosine gates are enforced, top-1 is recorded only (it means nothing untrained).
The trained-model and recovery cases are in test_precision.py; full-size RN50 and convnext_base runs
are in docs/measured.md."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("open_clip")
pytest.importorskip("timm")
onnx = pytest.importorskip("onnx")
Image = pytest.importorskip("PIL.Image")

import clipdeploy  # noqa: E402
from clipdeploy.export.config import ExportConfig  # noqa: E402
from clipdeploy.export.exporter import export_model  # noqa: E402
from clipdeploy.artifact.manifest import read_manifest  # noqa: E402
from clipdeploy.quantize.config import QuantizeConfig  # noqa: E402
from clipdeploy.quantize.stage import quantize  # noqa: E402

from tests.support.models import MODELS  # noqa: E402
from tests.support.photos import write_crops  # noqa: E402

CNN_MODELS = ("micro-convnext", "micro-resnet")  # registry names, also the test ids


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """160 random crops of the bundled photographs, at several scales."""
    return write_crops(tmp_path_factory.mktemp("crops"), 160, seed=0)


@pytest.fixture(scope="module", params=CNN_MODELS)
def artifact(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    model = MODELS[request.param]
    out = tmp / "artifact"
    export_model(ExportConfig(model=model.name, output=out, model_config=model.config_file(tmp), seed=model.seed))
    return out


@pytest.mark.parametrize("precision", ["fp16", "int8", "int8-fp16"])
def test_cnn_variant_passes_its_gate_on_photos(artifact, crops, precision, request):
    report = quantize(QuantizeConfig(artifact=artifact, precision=precision, calib_images=[crops],
                                     samples=96, holdout=48, threads=2, force=True))
    assert report["passed"], report["failures"]
    assert report["top1_enforced"] is False  # random weights
    floor = 0.999 if precision == "fp16" else 0.99
    assert report["image"]["min_cosine" if precision == "fp16" else "mean_cosine"] >= floor
    if precision != "fp16":  # the default per-sample floor, met on every held-out crop of both towers
        assert report["thresholds"]["min_cosine"] == 0.95
        assert min(report[t]["min_cosine"] for t in ("image", "text")) >= 0.95
    variants = {(v["tower"], v["precision"]): v for v in read_manifest(artifact)["variants"]}
    image = variants[("image", precision)]
    assert image["validation"]["passed"] is True

    if precision != "fp16":
        model = onnx.load(str(artifact / image["file"]))
        ops = {n.op_type for n in model.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        # Compact weights: int8 initializers feeding DequantizeLinear, no QuantizeLinear on a weight.
        assert image["weights"] == "int8"
        inits = {i.name: i.data_type for i in model.graph.initializer}
        assert not [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits]
        assert any(inits.get(n.input[0]) == onnx.TensorProto.INT8 for n in model.graph.node
                   if n.op_type == "DequantizeLinear")
        producers = {o: n for n in model.graph.node for o in n.output}
        lns = [n for n in model.graph.node if n.op_type == "LayerNormalization"]

        def source(name):  # int8-fp16 casts the fp16 DequantizeLinear output up for the fp32 LayerNorm
            node = producers[name]
            return producers[node.input[0]] if node.op_type == "Cast" else node

        conv_fed = [n for n in lns if source(n.input[0]).op_type == "DequantizeLinear"]
        if "convnext" in artifact.parent.name:
            assert conv_fed, "ConvNeXt's LayerNorms after a Conv carry Q/DQ on their input"

    session = clipdeploy.load(artifact, precision=precision)
    emb = session.encode_image(sorted(crops.glob("*.jpg"))[:4])
    ref = clipdeploy.load(artifact, precision="fp32").encode_image(sorted(crops.glob("*.jpg"))[:4])
    assert emb.dtype == np.float32 and emb.shape == ref.shape
    min_cosine = MODELS[request.node.callspec.params["artifact"]].expected["min_cosine"]
    assert float(np.min(np.sum(emb * ref, axis=1))) > min_cosine  # embeddings are L2-normalized


def test_cnn_families_are_what_the_test_claims(artifact, request):
    family = json.loads((Path(artifact) / "manifest.json").read_text())["model"]["family"]
    assert family == MODELS[request.node.callspec.params["artifact"]].expected["family"]
