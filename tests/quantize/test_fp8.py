"""fp8 (FLOAT8E4M3FN Q/DQ, fp16 elsewhere): made, gated on CPU and recorded like int8-fp16.

ONNX Runtime's CPU provider runs FLOAT8E4M3FN QuantizeLinear/DequantizeLinear, so the gate measures
the very graph TensorRT would build on compute capability 8.9+."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("open_clip")
pytest.importorskip("timm")
pytest.importorskip("ml_dtypes")
onnx = pytest.importorskip("onnx")

import clipdeploy  # noqa: E402
from clipdeploy import precisions  # noqa: E402
from clipdeploy.export.config import ExportConfig  # noqa: E402
from clipdeploy.export.exporter import export_model  # noqa: E402
from clipdeploy.artifact.manifest import read_manifest  # noqa: E402
from clipdeploy.quantize.config import QuantizeConfig  # noqa: E402
from clipdeploy.quantize.stage import quantize  # noqa: E402
from clipdeploy.validation import cosine_rows  # noqa: E402

from tests.quantize.test_cnn_towers import crops  # noqa: E402, F401  (a module fixture)
from tests.quantize.test_precision import _cfg, _copy, shapes, trained  # noqa: E402, F401
from tests.support.models import MODELS  # noqa: E402

FLOAT8 = onnx.TensorProto.FLOAT8E4M3FN


def _check_fp8_graph(path, stem_kept: bool = False, kept: frozenset = frozenset()) -> dict[str, int]:
    """The placement rules; ``kept``: nodes recovery left in fp16 (not quantized by design)."""
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    ops = [n.op_type for n in model.graph.node]
    counts = {"weights": 0, "activations": 0}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            assert n.input[0] not in inits, "weights are stored in fp8, not quantized at run time"
            assert inits[n.input[2]].data_type == FLOAT8
            counts["activations"] += 1
        if n.op_type == "DequantizeLinear":
            assert inits[n.input[2]].data_type == FLOAT8
            assert inits[n.input[1]].data_type == onnx.TensorProto.FLOAT16  # fp16 elsewhere, as int8-fp16
            if n.input[0] in inits:
                assert inits[n.input[0]].data_type == FLOAT8
                counts["weights"] += 1
            else:
                assert producers[n.input[0]].op_type == "QuantizeLinear"
    assert "Conv" in ops or "MatMul" in ops
    inputs = {i.name for i in model.graph.input}
    for n in model.graph.node:  # every MatMul/Gemm/Conv reads a DequantizeLinear on its data input ...
        if n.op_type in ("MatMul", "Gemm", "Conv"):
            src = producers.get(n.input[0])
            reads_pixels = n.input[0] in inputs or (src is not None and src.op_type == "Cast" and src.input[0] in inputs)
            if (stem_kept and n.op_type == "Conv" and reads_pixels) or n.name in kept:
                continue  # ... but the patch embedding, kept in fp16 by default
            assert producers[n.input[0]].op_type == "DequantizeLinear", n.name
    for n in model.graph.node:  # and a float8 tensor feeds its DequantizeLinear only
        if n.op_type == "QuantizeLinear":
            assert all(c.op_type == "DequantizeLinear" for c in model.graph.node if n.output[0] in c.input)
    return counts


def _photo_cfg(art, crops, **kw) -> QuantizeConfig:  # noqa: F811
    return QuantizeConfig(artifact=art, precision="fp8", calib_images=[crops], samples=96, holdout=48,
                          threads=2, force=True, **kw)


def _left_out(art) -> dict:
    """What the manifest records as kept out of fp8, per tower."""
    build = read_manifest(art)["validation"]["quantize"]["fp8"]["build"]
    return {t: build[t]["fp8"] for t in ("image", "text")}


# About a minute on the loaded 2-core machine (export, calibration, the gate, one recovery round).
@pytest.mark.slow
def test_fp8_passes_its_gate_on_the_trained_vit_with_photos(trained, shapes, crops, tmp_path):  # noqa: F811
    art = _copy(trained, tmp_path)
    # Photo crops for the image tower; the trained model's own class prompts for top-1 (ImageNet
    # prompts are near-ties for a model trained on shapes).
    report = quantize(_photo_cfg(art, crops, gate_prompts=shapes / "prompts.txt"))
    print(f"fp8 vit: image {report['image']}, text {report['text']}, top-1 {report['top1_agreement']}")
    assert report["passed"], report["failures"]
    assert report["thresholds"] == {"min_cosine": 0.97, "min_mean_cosine": 0.995, "min_top1": 0.97}
    assert report["top1_enforced"] is True
    for tower in ("image", "text"):
        kept = frozenset(k["node"] for k in report.get("recovery", {}).get("kept_in_higher_precision", {}).get(tower, []))
        counts = _check_fp8_graph(art / f"{tower}.fp8.onnx", stem_kept=tower == "image", kept=kept)
        assert counts["weights"] > 0 and counts["activations"] > 0
    left = _left_out(art)
    assert left["image"]["patch_embedding"]["kept"] == "fp16" and left["image"]["left_unquantized"]["excluded"]
    entries = {v["tower"]: v for v in read_manifest(art)["variants"] if v["precision"] == "fp8"}
    assert set(entries) == {"image", "text"} and all(e["opset"] >= 19 for e in entries.values())
    fp32, fp8 = clipdeploy.load(art, precision="fp32"), clipdeploy.load(art, precision="fp8")
    images = sorted(crops.glob("*.jpg"))[-8:]
    a, b = fp32.encode_image(images), fp8.encode_image(images)
    assert b.dtype == np.float32 and cosine_rows(a, b).min() > 0.97


@pytest.mark.slow
def test_fp8_passes_its_gate_on_convnext_photos(crops, tmp_path):  # noqa: F811
    model = MODELS["micro-convnext"]
    art = tmp_path / "artifact"
    export_model(ExportConfig(model=model.name, output=art, model_config=model.config_file(tmp_path), seed=model.seed))
    # The micro text tower has 7 quantizable nodes: the default 10% bound lets recovery keep none;
    # measured: plain fp8 text mean 0.9939 < 0.995, one round keeping its worst nodes in fp16 passes.
    report = quantize(_photo_cfg(art, crops, max_fp32_fraction=0.3))
    print(f"fp8 convnext: image {report['image']}, text {report['text']}")
    assert report["passed"], report["failures"]
    assert min(report[t]["min_cosine"] for t in ("image", "text")) >= 0.97
    assert _check_fp8_graph(art / "image.fp8.onnx", stem_kept=True)["weights"] > 0
    # The graph ONNX Runtime refused before (a float8 Transpose input) now loads and runs.
    emb = clipdeploy.load(art, precision="fp8").encode_image(sorted(crops.glob("*.jpg"))[:4])
    assert emb.shape[0] == 4 and np.isfinite(emb).all()


def test_fp8_is_registered_for_tensorrt_and_onnxruntime():
    spec = precisions.get("fp8")
    assert "fp8" in precisions.quantized() and spec.calibrated
    assert set(spec.backends) >= {"onnxruntime", "tensorrt"}
    assert "onnxruntime-cpu" in spec.slow_on  # emulated on CPU: benchmarks skip it unasked
