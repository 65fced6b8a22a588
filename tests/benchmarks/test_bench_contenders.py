"""Contender discovery from manifests: every runnable variant, and a reason for each one left out."""

from __future__ import annotations

import pytest

from pathlib import Path

from clipdeploy.artifact.view import ArtifactView
from clipdeploy.benchmarks import contenders as contenders_mod
from clipdeploy.benchmarks.contenders import ContenderSpec, discover
from clipdeploy.errors import UsageError
from clipdeploy.runtime.backends import onnxruntime as ort_backend
from clipdeploy.runtime.backends import registry as backends_mod


def _variant(tower, precision, fmt="onnx", passed=True):
    return {
        "tower": tower,
        "precision": precision,
        "format": fmt,
        "file": f"{tower}.{precision}.{fmt}",
        "sha256": "0" * 64,
        "validation": {"passed": passed},
    }


def _manifest(*variants):
    return ArtifactView.of(Path("art"), {"towers": {"image": {}, "text": {}}, "variants": list(variants)})


def _labels(specs):
    return [(s.backend, s.precision, s.towers) for s in specs]


@pytest.fixture(autouse=True)
def _everything_installed(monkeypatch):
    # The torch check lives in contenders, the backends' own checks in the backend registry.
    for mod in (contenders_mod, backends_mod):
        monkeypatch.setattr(mod, "has_module", lambda name: True)
    monkeypatch.setattr(ort_backend, "available_providers", lambda: ["CPUExecutionProvider"])


def test_cpu_defaults_fp32_and_int8_and_explain_the_rest():
    m = _manifest(
        *(_variant(t, p) for t in ("image", "text") for p in ("fp32", "fp16", "int8")),
        _variant("image", "fp16", "tensorrt"),
    )
    specs, skipped = discover(m, backends=("torch", "torch.compile", "onnxruntime", "tensorrt"), towers=("image", "text"),
                             device="cpu")
    assert _labels(specs) == [
        ("torch", "fp32", ("image", "text")),
        ("torch.compile", "fp32", ("image", "text")),
        ("onnxruntime", "fp32", ("image", "text")),
        ("onnxruntime", "int8", ("image", "text")),
    ]
    assert [s.role for s in specs[:3]] == ["reference", "peer", "clipdeploy"]
    reasons = {(s.backend, s.precision): s.reason for s in skipped}
    assert "--precisions fp16" in reasons[("onnxruntime", "fp16")]
    assert "NVIDIA GPU" in reasons[("tensorrt", "fp16")]


def test_explicit_precisions_and_missing_ones():
    m = _manifest(*(_variant(t, p) for t in ("image", "text") for p in ("fp32", "fp16")))
    specs, skipped = discover(
        m, backends=("onnxruntime",), towers=("image", "text"), device="cpu", precisions=("fp16", "int8")
    )
    assert _labels(specs) == [("onnxruntime", "fp16", ("image", "text"))]
    (missing,) = skipped
    assert missing.precision == "int8" and "clipdeploy quantize DIR --precision int8" in missing.reason


def test_a_tower_that_failed_its_gate_is_left_out_alone():
    m = _manifest(
        _variant("image", "fp32"),
        _variant("text", "fp32"),
        _variant("image", "int8"),
        _variant("text", "int8", passed=False),
    )
    specs, skipped = discover(m, backends=("onnxruntime",), towers=("image", "text"), device="cpu")
    assert _labels(specs) == [("onnxruntime", "fp32", ("image", "text")), ("onnxruntime", "int8", ("image",))]
    (gate,) = skipped
    assert gate.tower == "text" and "accuracy gate" in gate.reason


def test_gpu_runs_pytorch_peers_and_tensorrt():
    m = _manifest(
        _variant("image", "fp32"), _variant("image", "fp16", "tensorrt"), _variant("text", "fp16", "tensorrt")
    )
    specs, skipped = discover(m, backends=("torch", "torch.compile", "onnxruntime", "tensorrt"), towers=("image", "text"),
                             device="cuda")
    labels = _labels(specs)
    assert ("torch", "fp32", ("image", "text")) in labels
    assert ("torch", "fp16-autocast", ("image", "text")) in labels
    assert ("torch.compile", "fp32", ("image", "text")) in labels
    assert ("tensorrt", "fp16", ("image", "text")) in labels
    assert [s.role for s in specs if s.backend.startswith("torch")] == ["reference", "peer", "peer"]
    # This ONNX Runtime has no CUDA provider: said, not silently run on CPU.
    assert any(s.backend == "onnxruntime" and "CUDAExecutionProvider" in s.reason for s in skipped)


def test_missing_packages_are_reasons(monkeypatch):
    for mod in (contenders_mod, backends_mod):
        monkeypatch.setattr(mod, "has_module", lambda name: name not in ("torch", "tensorrt"))
    m = _manifest(_variant("image", "fp32"), _variant("image", "int8", "tensorrt"))
    specs, skipped = discover(m, backends=("torch", "onnxruntime", "tensorrt"), towers=("image",), device="cuda")
    assert _labels(specs) == []  # no CUDA provider for the fp32 ONNX either
    text = " ".join(s.reason for s in skipped)
    assert "clipdeploy[export]" in text and "clipdeploy[tensorrt]" in text


def test_towers_filter_and_unknown_backend():
    m = _manifest(_variant("image", "fp32"), _variant("text", "fp32"))
    specs, _ = discover(m, backends=("onnxruntime",), towers=("text",), device="cpu")
    assert _labels(specs) == [("onnxruntime", "fp32", ("text",))]
    with pytest.raises(UsageError, match="'tvm' is not one of"):
        discover(m, backends=("tvm",), towers=("text",), device="cpu")


def test_spec_round_trips():
    spec = ContenderSpec("onnxruntime", "int8", "cpu", ("image", "text"), "clipdeploy")
    assert ContenderSpec.from_dict(spec.to_dict()) == spec
    assert spec.label == "onnxruntime int8"


@pytest.fixture
def toy_ort(monkeypatch):
    """A toy backend that runs ONNX files on ONNX Runtime under its own name, registered for one test."""
    from clipdeploy.runtime.backends.onnxruntime import OrtOptions, OrtRunner

    def open_runners(view, precision, settings, verify):
        options = OrtOptions(intra_op_num_threads=settings.intra_op_num_threads)
        return backends_mod.open_onnx_files(view, precision, ("fp32",), verify, lambda p, v: OrtRunner(p, options))

    backends_mod.register(backends_mod.BackendSpec(
        "toy-ort", "onnx", ("cpu",), open_runners, lambda device: None, target=lambda settings: "toy-ort",
        runs={"fp32": 0}, targets=("toy-ort",), bench_settings=lambda bench: {"intra_op_num_threads": bench.threads},
    ))
    yield "toy-ort"
    backends_mod.unregister("toy-ort")


@pytest.mark.parametrize("backend", ["onnxruntime", "toy-ort"])
def test_a_precision_some_towers_lack_opens_those_towers_on_any_backend(backend, toy_ort, micro_artifact, tmp_path):
    """load() opens every tower; a contender for the towers that have the precision opens those alone, through
    its backend's own registration (before: ONNX Runtime only, built by hand)."""
    pytest.importorskip("onnxruntime")
    import shutil

    import numpy as np

    from clipdeploy.artifact.manifest import read_manifest, write_manifest
    from clipdeploy.benchmarks.contenders import OpenOptions, RuntimeContender

    art = tmp_path / "art"
    shutil.copytree(micro_artifact.path, art)
    manifest = read_manifest(art)
    for v in manifest["variants"]:
        if v["tower"] == "text":
            v["validation"]["passed"] = False  # the text fp32 variant did not pass: only image runs fp32
    write_manifest(art, manifest)
    spec = ContenderSpec(backend, "fp32", "cpu", ("image",), "clipdeploy")
    contender = RuntimeContender(spec, ArtifactView.read(art), OpenOptions(threads=1))
    assert contender.session.backend == backend and set(contender.session.runners) == {"image"}
    assert contender.session.runners["image"].session.get_session_options().intra_op_num_threads == 1
    pixels = np.zeros((2, 3, *ArtifactView.read(art).image_size), np.float32)
    assert contender.encode("image", pixels).shape == (2, 64)
