"""bf16: OpenVINO running the fp32 file in bf16, gated like fp16, only on CPUs with AVX512_BF16 or AMX-BF16.

On a CPU without them (this project's CI machine) it is refused with one line by `clipdeploy quantize`
and by ``load()``; a bf16 variant made elsewhere is passed over when the runtime picks for itself. The
gate itself can only run on a CPU that has bf16: that test skips, with the reason, everywhere else.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import clipdeploy
from clipdeploy import cpu_features, precisions
from clipdeploy.cli import main
from clipdeploy.errors import UsageError
from clipdeploy.artifact.manifest import read_manifest, variants, write_manifest
from clipdeploy.runtime.backends import registry

NO_BF16 = frozenset({"avx2", "fma", "avx512_vnni"})
WITH_BF16 = NO_BF16 | {"avx512_bf16"}


@pytest.fixture
def no_bf16(monkeypatch):
    monkeypatch.setattr(cpu_features, "flags", lambda: NO_BF16)


def test_bf16_is_registered_for_openvino_with_the_cpu_it_needs():
    spec = precisions.get("bf16")
    assert "bf16" in precisions.quantized() and spec.backends == ("openvino",)
    assert spec.gate == {"min_cosine": 0.999} and spec.gate_backend == "openvino"
    assert spec.runs_file_of == "fp32" and spec.backend_settings == {"openvino": {"INFERENCE_PRECISION_HINT": "bf16"}}
    assert set(spec.cpu_features) == {"avx512_bf16", "amx_bf16"}
    assert precisions.preference("openvino-cpu") == ("int8", "bf16", "fp32")
    assert "bf16" not in precisions.preference("onnxruntime-cpu")


def test_quantize_bf16_refuses_in_one_line_without_the_cpu_feature(micro_artifact, tmp_path, no_bf16, capsys):
    before = (micro_artifact.path / "manifest.json").read_bytes()
    code = main(["quantize", str(micro_artifact.path), "--precision", "bf16", "--calib-images", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "avx512_bf16 or amx_bf16" in err and "precision='fp32'" in err and "Traceback" not in err
    assert (micro_artifact.path / "manifest.json").read_bytes() == before  # nothing written


def test_load_bf16_refuses_in_one_line_without_the_cpu_feature(micro_artifact, no_bf16):
    for backend in ("auto", "openvino", "onnxruntime"):
        with pytest.raises(UsageError) as e:
            clipdeploy.load(micro_artifact.path, backend=backend, precision="bf16")
        msg = str(e.value)
        assert "\n" not in msg and "avx512_bf16 or amx_bf16" in msg and "precision='fp32'" in msg, msg


def _with_bf16_variant(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose manifest has an accepted bf16 variant, as quantize writes it on a bf16 CPU."""
    shutil.copytree(src, dst)
    manifest = read_manifest(dst)
    extra = []
    for v in manifest["variants"]:
        if v["precision"] == "fp32" and v["format"] == "onnx":
            extra.append({**v, "precision": "bf16", "source": v["file"], "requires_cpu": ["avx512_bf16", "amx_bf16"],
                          "validation": {"reference": "fp32", "passed": True, "min_cosine": 0.9995}})
    manifest["variants"] += extra
    write_manifest(dst, manifest)
    return dst


def test_a_bf16_variant_made_elsewhere_is_passed_over_here(micro_artifact, tmp_path, monkeypatch):
    art = _with_bf16_variant(micro_artifact.path, tmp_path / "art")
    manifest = read_manifest(art)
    preference = precisions.preference("openvino-cpu")
    monkeypatch.setattr(cpu_features, "flags", lambda: NO_BF16)
    assert registry.select_variant(manifest, "image", "onnx", None, preference).precision == "fp32"
    with pytest.raises(UsageError, match="needs a CPU with avx512_bf16 or amx_bf16"):
        registry.select_variant(manifest, "image", "onnx", "bf16", preference)
    monkeypatch.setattr(cpu_features, "flags", lambda: WITH_BF16)
    picked = registry.select_variant(manifest, "image", "onnx", None, preference)
    assert picked.precision == "bf16" and picked.file == "image.fp32.onnx"
    # Another backend would run the fp32 file and call it bf16: refused, naming the backend that runs it.
    with pytest.raises(UsageError, match="runs on openvino only, not on onnxruntime; pass backend='openvino'"):
        clipdeploy.load(art, backend="onnxruntime", precision="bf16")


def test_openvino_picks_fp32_over_a_bf16_variant_it_cannot_run(micro_artifact, tmp_path, no_bf16):
    pytest.importorskip("openvino", reason="the openvino backend needs pip install 'clipdeploy[openvino]'")
    art = _with_bf16_variant(micro_artifact.path, tmp_path / "art")
    session = clipdeploy.load(art, backend="openvino", backend_options={"openvino_cache_dir": ""})
    assert session.precision == {"image": "fp32", "text": "fp32"}


@pytest.mark.skipif(not cpu_features.has_bf16(), reason="this CPU has neither AVX512_BF16 nor AMX-BF16: bf16 is "
                    "refused here (tested above), so its gate can only run on a CPU that has one")
def test_bf16_passes_its_gate_on_photos(micro_artifact, tmp_path):
    pytest.importorskip("openvino", reason="the bf16 gate runs on OpenVINO: pip install 'clipdeploy[openvino]'")
    from clipdeploy.quantize.config import QuantizeConfig
    from clipdeploy.quantize.stage import quantize
    from tests.support.photos import write_crops

    art = tmp_path / "art"
    shutil.copytree(micro_artifact.path, art)
    crops = write_crops(tmp_path / "crops", 64, seed=2)  # crops of real photographs, at several scales
    report = quantize(QuantizeConfig(artifact=art, precision="bf16", calib_images=[crops], samples=32, holdout=32,
                                     threads=2))
    assert report["passed"], report["failures"]
    assert report["variant_backend"] == "openvino"
    assert min(report[t]["min_cosine"] for t in ("image", "text")) >= 0.999
    manifest = read_manifest(art)
    bf16 = {v.tower: v for v in variants(manifest) if v.precision == "bf16"}
    fp32 = {v.tower: v for v in variants(manifest) if v.precision == "fp32"}
    assert set(bf16) == {"image", "text"}
    for tower, v in bf16.items():
        assert (v.file, v.sha256) == (fp32[tower].file, fp32[tower].sha256)  # no file of its own
        assert v.extra["requires_cpu"] == ["avx512_bf16", "amx_bf16"] and v.accepted
    assert not list(art.glob("*.bf16.onnx"))
    session = clipdeploy.load(art, backend="openvino", backend_options={"openvino_cache_dir": ""})
    assert session.precision == {"image": "bf16", "text": "bf16"}
    reference = clipdeploy.load(art, backend="onnxruntime", precision="fp32")
    texts = ["a photo of a cat", "a red circle"]
    cos = np.sum(session.encode_text(texts) * reference.encode_text(texts), axis=1)
    assert cos.min() >= 0.999
    json.dumps(report)  # the report is what the manifest records


def test_a_bf16_variant_is_not_built_by_tensorrt_nor_served_by_triton(micro_artifact, tmp_path):
    from clipdeploy.artifact.view import ArtifactView
    from clipdeploy.engines.builder import sources
    from clipdeploy.engines.config import BuildConfig
    from clipdeploy.triton.repository import TritonConfig, collect

    art = _with_bf16_variant(micro_artifact.path, tmp_path / "art")
    with pytest.raises(UsageError, match="bf16 runs on openvino only, not TensorRT"):
        sources(ArtifactView.read(art), BuildConfig(artifact=art, precision="bf16"))
    warnings: list[str] = []
    notes: set[str] = set()
    (plan,) = collect(TritonConfig(artifacts=[art], output=tmp_path / "repo", precisions=("bf16", "fp32")),
                      warnings, notes)
    assert {v.precision for v in plan.onnx} == {"fp32"}  # Triton's ONNX Runtime would run bf16 as fp32
    assert any("bf16 ONNX variants are left out" in n for n in notes), notes
