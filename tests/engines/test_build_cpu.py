"""The build stage and the TensorRT backend on a machine without TensorRT or a GPU: configuration,
engine matching, profiles, refusals and one-line errors. Nothing here needs the bindings."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

import clipdeploy
from clipdeploy.engines.builder import axis_ranges, plan_name
from clipdeploy.engines.config import BuildConfig, parse_range, parse_size
from clipdeploy.engines.validate import check_compute_capability
from clipdeploy.cli import main
from clipdeploy.errors import ArtifactError, DependencyError, EngineError, UsageError
from clipdeploy.artifact.manifest import read_manifest
from clipdeploy.artifact.view import ArtifactView
from clipdeploy.runtime.backends.tensorrt import select_engine
from clipdeploy.runtime.tensorrt_compat import engine_mismatch
from clipdeploy.runtime import cuda
from clipdeploy.runtime.cuda import GpuInfo

H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", (9, 0), 80 << 30)
L4 = GpuInfo(0, "NVIDIA L4", (8, 9), 24 << 30)
T4 = GpuInfo(0, "Tesla T4", (7, 5), 16 << 30)


def engine(**extra):
    entry = {
        "tower": "image",
        "precision": "fp16",
        "format": "tensorrt",
        "file": "engines/x.plan",
        "sha256": "0",
        "tensorrt_version": "11.4.0.106",
        "gpu": H100.name,
        "compute_capability": "9.0",
        "hardware_compatibility": "none",
        "version_compatible": False,
        "validation": {"passed": True},
    }
    entry.update(extra)
    return entry


# ---- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"precision": "fp4"}, "precision 'fp4'"),
        ({"towers": ("audio",)}, "audio"),
        ({"batch": (4, 2, 8)}, "MIN <= OPT <= MAX"),
        ({"batch": (0, 1, 8)}, "1 <= MIN"),
        ({"shapes": {"batch": (1, 2, 3)}}, "batch="),
        ({"opt_level": 6}, "0 to 5"),
        ({"hardware_compat": "turing-plus"}, "ampere-plus"),
        ({"workspace": 0}, "positive"),
        ({"device": -1}, "device -1"),
    ],
)
def test_build_config_refuses_bad_values(tmp_path, kwargs, match):
    with pytest.raises(UsageError, match=match):
        BuildConfig(tmp_path, **kwargs)


def test_ranges_and_sizes_parse():
    assert parse_range("1:8:64") == (1, 8, 64)
    assert parse_range("16") == (16, 16, 16)
    assert parse_size("4GiB") == 4 << 30 and parse_size("512MiB") == 512 << 20
    assert parse_size("2GB") == 2_000_000_000 and parse_size("1000") == 1000
    with pytest.raises(UsageError, match="MIN:OPT:MAX"):
        parse_range("1:x:3")
    with pytest.raises(UsageError, match="4GiB"):
        parse_size("lots")


def test_plans_are_named_by_tower_precision_gpu_and_version():
    assert plan_name("image", "fp16", H100, "11.4.0.106", "none", False) == "image.fp16.sm90.trt11.4.0.plan"
    assert (
        plan_name("text", "int8", L4, "10.13.3.9.post1", "same-compute-capability", False)
        == "text.int8.sm89.trt10.13.3.plan"
    )
    assert (
        plan_name("image", "fp32", L4, "11.4.0.106", "ampere-plus", True) == "image.fp32.ampere-plus.trt11.4.0-vc.plan"
    )


def test_profiles_cover_every_named_dynamic_axis(tiny_artifact):
    manifest = ArtifactView.read(tiny_artifact)
    cfg = BuildConfig(tiny_artifact, batch=(1, 4, 16))
    image = axis_ranges("image", [("pixel_values", (-1, 3, 32, 32))], manifest, cfg)
    (lo, opt, hi), axes = image["pixel_values"]
    assert (lo, opt, hi) == ((1, 3, 32, 32), (4, 3, 32, 32), (16, 3, 32, 32)) and axes[0] == "batch"
    text = axis_ranges("text", [("input_ids", (-1, -1))], manifest, cfg)
    assert text["input_ids"][0] == ((1, 1), (4, 32), (16, 77))  # sequence defaults to 1:32:context length
    cfg = BuildConfig(tiny_artifact, shapes={"sequence": (2, 8, 16)})
    assert axis_ranges("text", [("input_ids", (-1, -1))], manifest, cfg)["input_ids"][0] == ((1, 2), (8, 8), (64, 16))
    assert axis_ranges("text", [("input_ids", (-1, 77))], manifest, cfg)["input_ids"][0] == ((1, 77), (8, 77), (64, 77))
    assert axis_ranges("text", [("input_ids", (1, 77))], manifest, cfg) == {}  # nothing dynamic, no profile
    with pytest.raises(UsageError, match="context length 77"):
        axis_ranges(
            "text", [("input_ids", (-1, -1))], manifest, BuildConfig(tiny_artifact, shapes={"sequence": (1, 8, 78)})
        )
    raw = read_manifest(tiny_artifact)
    raw["towers"]["text"]["inputs"][0]["shape"] = ["batch", "sequence", "tiles"]
    with pytest.raises(UsageError, match="dynamic axis 'tiles'.*--shape tiles=MIN:OPT:MAX"):
        axis_ranges("text", [("input_ids", (-1, -1, -1))], ArtifactView.of(tiny_artifact, raw), cfg)


def test_a_sequence_axis_without_a_context_length_asks_for_its_range(tiny_artifact):
    """With no context length recorded anywhere, the sequence range is not guessed (it once was: 77)."""
    raw = read_manifest(tiny_artifact)
    del raw["tokenizer"]["context_length"]
    view = ArtifactView.of(tiny_artifact, raw)
    assert view.context_length is None
    with pytest.raises(UsageError, match="dynamic axis 'sequence'.*--shape sequence=MIN:OPT:MAX"):
        axis_ranges("text", [("input_ids", (-1, -1))], view, BuildConfig(tiny_artifact))
    cfg = BuildConfig(tiny_artifact, shapes={"sequence": (1, 8, 100)})
    assert axis_ranges("text", [("input_ids", (-1, -1))], view, cfg)["input_ids"][0] == ((1, 1), (8, 8), (64, 100))


# ---- engine matching ----------------------------------------------------------------------------


def test_engines_match_their_gpu_and_tensorrt_version():
    assert engine_mismatch(engine(), H100, "11.4.0.106") is None
    assert (
        engine_mismatch(engine(tensorrt_version="10.13.3.9", compute_capability="8.9"), L4, "10.13.3.9.post1") is None
    )
    assert "TensorRT 11.4.0, this is TensorRT 11.4.1" in engine_mismatch(engine(), H100, "11.4.1.2")
    assert "compute capability 9.0" in engine_mismatch(engine(), L4, "11.4.0.106")
    assert (
        engine_mismatch(
            engine(compute_capability="8.9", hardware_compatibility="same-compute-capability"), L4, "11.4.0.106"
        )
        is None
    )
    assert engine_mismatch(engine(hardware_compatibility="ampere-plus"), L4, "11.4.0.106") is None
    assert "Ampere or newer" in engine_mismatch(engine(hardware_compatibility="ampere-plus"), T4, "11.4.0.106")
    vc = engine(tensorrt_version="11.2.1.2", version_compatible=True)
    assert engine_mismatch(vc, H100, "11.4.0.106") is None  # later versions of the same major load it
    assert "version-compatible" in engine_mismatch(vc, H100, "11.1.0.106")
    assert "version-compatible" in engine_mismatch(vc, H100, "12.0.0.1")


def test_engine_selection_prefers_fast_accepted_engines_here():
    manifest = {
        "towers": {"image": {}},
        "variants": [
            engine(precision="fp32", file="engines/a.plan"),
            engine(precision="fp16", file="engines/b.plan", validation={}),
            engine(precision="int8-fp16", file="engines/c.plan", compute_capability="8.0"),
            engine(precision="fp16", file="engines/d.plan", version_compatible=True),
        ],
    }
    pref = ("int8-fp16", "fp16", "fp32")
    assert select_engine(manifest, "image", None, H100, "11.4.0.106", pref).file == "engines/a.plan"
    assert (
        select_engine(manifest, "image", None, H100, "11.4.0.106", pref, host_code_allowed=True).file
        == "engines/d.plan"
    )
    with pytest.raises(ArtifactError, match="has not been validated; run `clipdeploy validate DIR`"):
        select_engine(manifest, "image", "fp16", H100, "11.4.0.106", pref)
    with pytest.raises(EngineError, match="built for compute capability 8.0.*rebuild it here"):
        select_engine(manifest, "image", "int8-fp16", H100, "11.4.0.106", pref)
    with pytest.raises(ArtifactError, match="no int8 TensorRT engine of the image tower.*clipdeploy build"):
        select_engine(manifest, "image", "int8", H100, "11.4.0.106", pref)
    only_vc = {"towers": {"image": {}}, "variants": [engine(version_compatible=True)]}
    with pytest.raises(EngineError, match="engine_host_code_allowed=True"):
        select_engine(only_vc, "image", None, H100, "11.4.0.106", pref)


# ---- commands and loading without TensorRT -----------------------------------------------------


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as if it were not installed, even where it is
    monkeypatch.setattr(cuda, "gpu_present", lambda: True)  # a GPU machine without TensorRT (no GPU: test_no_gpu.py)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_build_without_tensorrt_is_a_one_line_error_with_the_fix(tiny_artifact, capsys, no_tensorrt):
    assert main(["build", str(tiny_artifact), "--precision", "fp16"]) == 2
    err = _one_line_error(capsys)
    assert "TensorRT is not installed" in err and "pip install 'clipdeploy[tensorrt]'" in err
    assert not (tiny_artifact / "engines").exists()


def test_build_names_the_missing_variant_before_needing_tensorrt(tiny_artifact, capsys, no_tensorrt):
    assert main(["build", str(tiny_artifact), "--precision", "int8"]) == 2
    assert "no int8 ONNX variant of the image tower to compile (have: fp16, fp32)" in _one_line_error(capsys)
    assert main(["build", str(tiny_artifact), "--batch", "8:2:4"]) == 2
    assert "MIN <= OPT <= MAX" in _one_line_error(capsys)


def test_validate_without_engines_or_tensorrt(tiny_artifact, capsys, no_tensorrt):
    assert main(["validate", str(tiny_artifact)]) == 2
    assert "no TensorRT engines to validate" in _one_line_error(capsys)
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    m["variants"].append(engine(file="engines/image.fp16.sm90.trt11.4.0.plan"))
    (tiny_artifact / "manifest.json").write_text(json.dumps(m))
    assert main(["validate", str(tiny_artifact)]) == 2
    assert "pip install 'clipdeploy[tensorrt]'" in _one_line_error(capsys)


def test_build_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["build", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--precision",
        "--batch",
        "--seq-len",
        "--shape",
        "--workspace",
        "--opt-level",
        "--timing-cache",
        "--hardware-compat",
        "--version-compat",
        "--device",
        "--no-validate",
    ):
        assert option in out


def test_auto_backend_falls_back_to_onnxruntime_and_says_why(tiny_artifact, caplog, no_tensorrt, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setitem(sys.modules, "openvino", None)  # the [cpu]-only install: OpenVINO ranks first where present
    caplog.set_level(logging.INFO, logger="clipdeploy")
    assert clipdeploy.load(tiny_artifact).backend == "onnxruntime"
    assert "backend='auto' chose onnxruntime (tensorrt: the artifact has no TensorRT engines; openvino: OpenVINO is not installed" in caplog.text
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    m["variants"].append(engine(file="engines/image.fp16.sm90.trt11.4.0.plan"))
    (tiny_artifact / "manifest.json").write_text(json.dumps(m))
    caplog.clear()
    assert clipdeploy.load(tiny_artifact).backend == "onnxruntime"
    assert "TensorRT is not installed" in caplog.text


def test_tensorrt_backend_without_engines_or_tensorrt(tiny_artifact, no_tensorrt):
    with pytest.raises(ArtifactError, match="no TensorRT engine of the image tower.*clipdeploy build"):
        clipdeploy.load(tiny_artifact, backend="tensorrt")
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    m["variants"] += [engine(file="engines/i.plan"), engine(tower="text", file="engines/t.plan")]
    (tiny_artifact / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DependencyError, match=r"pip install 'clipdeploy\[tensorrt\]'"):
        clipdeploy.load(tiny_artifact, backend="tensorrt")


def test_no_gpu_is_a_dependency_error():
    from clipdeploy.runtime import cuda

    try:
        if cuda.device_count() > 0:
            pytest.skip("this machine has a GPU")
    except DependencyError:
        pass  # no cuda-python: gpu_info says so below
    with pytest.raises(DependencyError, match="GPU|cuda-python"):
        cuda.gpu_info(0)


def test_build_and_runtime_modules_import_nothing_heavy():
    code = (
        "import sys, clipdeploy.engines, clipdeploy.engines.builder, clipdeploy.engines.command, "
        "clipdeploy.engines.validate, clipdeploy.runtime.backends.tensorrt, clipdeploy.runtime.cuda, "
        "clipdeploy.cli\nheavy = ('tensorrt', 'cuda', 'torch', 'onnxruntime', 'onnx')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ---- ONNX Runtime provider options and torch tensors --------------------------------------------


def test_onnxruntime_takes_providers_with_options(tiny_artifact):
    pytest.importorskip("onnxruntime")
    from clipdeploy.runtime.backends.onnxruntime import OrtOptions, OrtRunner

    runner = OrtRunner(tiny_artifact / "image.fp32.onnx", OrtOptions(providers=(("CPUExecutionProvider", {}),)))
    assert runner.providers[0] == "CPUExecutionProvider"
    s = clipdeploy.load(tiny_artifact, backend="onnxruntime", providers=[("CPUExecutionProvider", {})])
    assert s.encode_pixels(np.ones((1, 3, 32, 32), np.float32)).shape == (1, 16)


def test_torch_tensors_in_and_out_on_the_host_path(tiny_artifact):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from tests.support.tiny_artifact import expected

    s = clipdeploy.load(tiny_artifact, backend="onnxruntime")
    x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    want = expected(x)
    got = s.encode_pixels(torch.from_numpy(x), normalize=False)
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    as_torch = s.encode_pixels(x, normalize=False, return_torch=True)
    assert isinstance(as_torch, torch.Tensor)
    np.testing.assert_allclose(as_torch.numpy(), want, rtol=1e-5)
    ids = torch.tensor(s.tokenize(["a cat"]))
    np.testing.assert_allclose(s.encode_tokens(ids), s.encode_text(["a cat"]), rtol=1e-6)


@pytest.mark.parametrize("cc, refused", [((8, 0), True), ((8, 6), True), ((8, 9), False), ((9, 0), False),
                                         ((10, 0), False)])
def test_fp8_engines_need_compute_capability_8_9(cc, refused):
    gpu = GpuInfo(0, "Some GPU", cc, 1 << 34)
    if refused:
        with pytest.raises(EngineError, match=r"fp8 engines need compute capability 8\.9 or higher") as e:
            check_compute_capability("fp8", gpu)
        assert "\n" not in str(e.value) and f"is {cc[0]}.{cc[1]}" in str(e.value)
    else:
        check_compute_capability("fp8", gpu)
    for other in ("fp16", "int8-fp16", "fp32"):  # the other precisions run on any TensorRT GPU
        check_compute_capability(other, gpu)
