"""The OpenVINO backend: every CPU variant of ViT, ModifiedResNet and ConvNeXt micro artifacts runs on it and
matches ONNX Runtime; threads, the compiled-model cache and backend="auto" (with and without OpenVINO)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

openvino = pytest.importorskip("openvino", reason="the openvino backend needs pip install 'clipdeploy[openvino]'")
pytest.importorskip("onnxruntime", reason="OpenVINO is compared with ONNX Runtime")
pytest.importorskip("open_clip", reason="the micro artifacts are exported from open_clip models")
pytest.importorskip("timm", reason="micro-convnext is a timm tower")
Image = pytest.importorskip("PIL.Image")

import clipdeploy  # noqa: E402
from clipdeploy import cpu_features, precisions  # noqa: E402
from clipdeploy.errors import UsageError  # noqa: E402
from clipdeploy.export.config import ExportConfig  # noqa: E402
from clipdeploy.export.exporter import export_model  # noqa: E402
from clipdeploy.quantize.stage import QuantizeConfig, quantize  # noqa: E402

from tests.support.cpus import use_cpu  # noqa: E402
from tests.support.models import MODELS  # noqa: E402
from tests.support.photos import write_crops  # noqa: E402

PROMPTS = ["a photo of a cat", "a red circle", "an astronaut", "coffee", "a very long caption " * 5, "x"]


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    return write_crops(tmp_path_factory.mktemp("ov-crops"), 64, seed=1)


@pytest.fixture(scope="module", params=["micro-vit", "micro-resnet", "micro-convnext"])
def artifact(request, tmp_path_factory, crops) -> Path:
    """A micro artifact with fp32 and int8 variants (int8 calibrated and gated on photo crops)."""
    tmp = tmp_path_factory.mktemp(request.param)
    model = MODELS[request.param]
    out = tmp / "artifact"
    export_model(ExportConfig(model=model.name, output=out, model_config=model.config_file(tmp), seed=model.seed))
    report = quantize(QuantizeConfig(artifact=out, precision="int8", calib_images=[crops], samples=32, holdout=32,
                                     threads=2, force=True))
    assert report["passed"], report["failures"]
    return out


@pytest.fixture
def cache(tmp_path) -> dict:
    return {"openvino_cache_dir": str(tmp_path / "ov-cache")}


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_every_cpu_variant_matches_onnxruntime(artifact, crops, cache, precision):
    if precision == "int8" and not cpu_features.has_vnni():
        # Measured on an AVX2 EPYC: OpenVINO int8 0.97-0.987 against ONNX Runtime's exact U8U8 int8; this is
        # why auto never picks it there and an explicit load refuses it (test_int8_without_vnni_is_refused).
        pytest.skip("OpenVINO int8 without VNNI is less accurate than the gated ONNX Runtime int8 (issue 14)")
    ov = clipdeploy.load(artifact, backend="openvino", precision=precision, backend_options=cache)
    ort = clipdeploy.load(artifact, backend="onnxruntime", precision=precision)
    assert ov.precision == {"image": precision, "text": precision}
    images = sorted(crops.iterdir())[:10]
    floor = 0.9999 if precision == "fp32" else precisions.get("int8").engine_tolerance["min_cosine"]
    for tower, a, b in (("image", ov.encode_image(images), ort.encode_image(images)),
                        ("text", ov.encode_text(PROMPTS), ort.encode_text(PROMPTS))):
        cos = np.sum(a * b, axis=1)
        assert cos.min() >= floor, f"{tower} {precision}: OpenVINO vs ONNX Runtime min cosine {cos.min():.6f} < {floor}"


def test_eight_threads_give_single_thread_results(artifact, crops, cache):
    # Thread safety, not accuracy: without VNNI, int8 runs only when opted into (see the refusal test).
    opts = {**cache, "openvino_int8_without_vnni": True}
    session = clipdeploy.load(artifact, backend="openvino", precision="int8", backend_options=opts)
    images = sorted(crops.iterdir())[:8]
    texts = [[PROMPTS[(i + j) % len(PROMPTS)] for j in range(1 + i % 4)] for i in range(8)]  # lengths differ
    want_img = [session.encode_image(images[: 1 + i]) for i in range(8)]
    want_txt = [session.encode_text(t) for t in texts]
    got: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                got[i] = (session.encode_image(images[: 1 + i]), session.encode_text(texts[i]))
        except BaseException as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(8):
        np.testing.assert_array_equal(got[i][0], want_img[i])
        np.testing.assert_array_equal(got[i][1], want_txt[i])


def test_settings_reach_openvino_and_the_cache_is_reused(artifact, tmp_path):
    cache_dir = tmp_path / "cache"
    opts = {"openvino_cache_dir": str(cache_dir)}
    before = sorted(artifact.rglob("*"))
    first = clipdeploy.load(artifact, backend="openvino", precision="fp32", intra_op_num_threads=1,
                            backend_options=opts)
    image = first.runners["image"]
    assert int(image.compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    # f32 explicitly, so a bf16-capable CPU does not run the fp32 variant in bf16 behind the gate's back
    assert image.compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32
    assert image.cache_dir is not None and image.cache_dir.parent == cache_dir
    blobs = sorted(p.name for p in image.cache_dir.iterdir())
    assert blobs, "OpenVINO wrote no compiled blob to the cache"
    assert sorted(artifact.rglob("*")) == before  # nothing written inside the artifact
    second = clipdeploy.load(artifact, backend="openvino", precision="fp32", intra_op_num_threads=1,
                             backend_options=opts)
    assert second.runners["image"].cache_dir == image.cache_dir  # same key: same file, version, CPU, settings
    assert sorted(p.name for p in image.cache_dir.iterdir()) == blobs  # a hit, nothing recompiled
    px = first.preprocess([Image.new("RGB", (70, 50), "red")])
    np.testing.assert_array_equal(first.encode_pixels(px), second.encode_pixels(px))
    other = clipdeploy.load(artifact, backend="openvino", precision="fp32", intra_op_num_threads=2,
                            backend_options=opts)
    assert other.runners["image"].cache_dir != image.cache_dir  # settings are part of the key
    off = clipdeploy.load(artifact, backend="openvino", precision="fp32", backend_options={"openvino_cache_dir": ""})
    assert off.runners["image"].cache_dir is None


def test_auto_picks_openvino_and_says_why(artifact, cache, monkeypatch, tmp_path):
    use_cpu(monkeypatch, tmp_path, "avx512-vnni")
    session = clipdeploy.load(artifact, backend_options=cache)
    assert session.backend == "openvino"
    assert session.precision == {"image": "int8", "text": "int8"}
    text = session.describe()
    assert "int8 onnx on openvino" in text and "auto: openvino ranks before onnxruntime" in text, text
    assert "most preferred accepted precision" in text, text
    named = clipdeploy.load(artifact, backend="openvino", backend_options=cache)
    assert named.why is None and named.precision == session.precision


def test_without_vnni_auto_keeps_onnxruntime(artifact, cache, monkeypatch, tmp_path):
    use_cpu(monkeypatch, tmp_path, "avx2")
    session = clipdeploy.load(artifact, backend_options=cache)
    assert session.backend == "onnxruntime" and session.precision == {"image": "int8", "text": "int8"}
    assert "openvino: ranked first only on CPUs with VNNI" in session.describe(), session.describe()


def test_without_openvino_auto_is_what_it_was(artifact, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if only [cpu] were installed
    session = clipdeploy.load(artifact)
    assert session.backend == "onnxruntime" and session.precision == {"image": "int8", "text": "int8"}
    assert "openvino: OpenVINO is not installed" in session.describe()
    plain = clipdeploy.load(artifact, backend="onnxruntime")
    np.testing.assert_array_equal(session.encode_text(PROMPTS), plain.encode_text(PROMPTS))


def test_int8_without_vnni_is_refused_unless_opted_into(artifact, cache, monkeypatch, tmp_path):
    """What is served must be what was gated: the int8 gate ran on ONNX Runtime, and OpenVINO's int8 without
    VNNI measured less accurate (cosine 0.969 vs 0.9997 on ViT-B-32)."""
    use_cpu(monkeypatch, tmp_path, "avx2")
    with pytest.raises(UsageError) as e:
        clipdeploy.load(artifact, backend="openvino", precision="int8", backend_options=cache)
    msg = str(e.value)
    assert "\n" not in msg and "without VNNI" in msg and "backend='onnxruntime'" in msg, msg
    assert "openvino_int8_without_vnni" in msg
    # Picking for itself, the openvino backend passes over int8 here rather than failing.
    assert clipdeploy.load(artifact, backend="openvino", backend_options=cache).precision == {"image": "fp32",
                                                                                              "text": "fp32"}
    opted = clipdeploy.load(artifact, backend="openvino", precision="int8",
                            backend_options={**cache, "openvino_int8_without_vnni": True})
    assert opted.precision == {"image": "int8", "text": "int8"}
    use_cpu(monkeypatch, tmp_path, "avx512-vnni")
    assert clipdeploy.load(artifact, backend="openvino", backend_options=cache).precision["image"] == "int8"
