"""GPU tests: real TensorRT engines from exported towers at every precision, run through the runtime and
compared with ONNX Runtime. They skip, saying why, without TensorRT and an NVIDIA GPU.

Run them on a GPU machine (TensorRT 10.13+ or 11, cuda-python, ONNX Runtime, the export extra):
    pip install -e '.[tensorrt,gpu,export,dev]'      # or [tensorrt10,...] for TensorRT 10 / CUDA 12
    pytest -m "tensorrt or gpu" tests/engines
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

import clipdeploy
from clipdeploy.engines import BuildConfig, build_engines, validate_engines
from clipdeploy.engines.validate import TOLERANCES
from clipdeploy.errors import EngineError, InputError
from clipdeploy.validation import compare
from tests.support.cpus import auto_cpu_backend

PRECISIONS = ("fp32", "fp16", "int8", "int8-fp16")
SAMPLES = sorted((Path(clipdeploy.__file__).parent / "data" / "images").glob("*.jpg"))


def _missing() -> str | None:
    """Why these tests cannot run here; checked at collection, so no fixture (no export) runs in vain."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed: pip install 'clipdeploy[tensorrt]' (or [tensorrt10]) on a GPU machine"
    if importlib.util.find_spec("onnxruntime") is None:
        return "ONNX Runtime is not installed: pip install 'clipdeploy[gpu]'"
    from clipdeploy.errors import DependencyError
    from clipdeploy.runtime import cuda

    try:
        return None if cuda.device_count() > 0 else "no NVIDIA GPU visible to CUDA"
    except DependencyError as e:
        return str(e)


MISSING = _missing()
pytestmark = [pytest.mark.tensorrt, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


@pytest.fixture(scope="module")
def trt_version() -> str:
    from clipdeploy.runtime.tensorrt_compat import import_tensorrt

    return str(import_tensorrt().__version__)


def _calibration_images(folder: Path, count: int = 64) -> Path:
    from PIL import Image, ImageOps

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        img = Image.open(SAMPLES[i % len(SAMPLES)]).convert("RGB")
        w, h = img.size
        box = [
            int(v)
            for v in (
                rng.uniform(0, w / 4),
                rng.uniform(0, h / 4),
                rng.uniform(3 * w / 4, w),
                rng.uniform(3 * h / 4, h),
            )
        ]
        img = img.crop(box)
        if i % 2:
            img = ImageOps.mirror(img)
        img.save(folder / f"{i:03d}.jpg")
    return folder


@pytest.fixture(scope="module")
def artifact(trt_version, micro_artifact, tmp_path_factory) -> Path:
    """The micro ViT, quantized to every precision (gates relaxed: this tests engines, not quantization)."""
    from clipdeploy.quantize.stage import QuantizeConfig, quantize

    root = tmp_path_factory.mktemp("trt")
    art = Path(shutil.copytree(micro_artifact.path, root / "artifact"))
    images = _calibration_images(root / "calib")
    for precision in PRECISIONS[1:]:
        quantize(
            QuantizeConfig(
                artifact=art,
                precision=precision,
                calib_images=[images],
                samples=32,
                holdout=32,
                min_samples=16,
                min_cosine=0.0,
                min_mean_cosine=0.0,
                min_top1=0.0,
                recover=False,
            )
        )
    return art


@pytest.fixture(scope="module")
def built(artifact) -> dict[str, list[dict]]:
    cache = artifact.parent / "timing.cache"
    return {
        p: build_engines(BuildConfig(artifact, precision=p, batch=(1, 4, 16), timing_cache=cache)) for p in PRECISIONS
    }


def _pixels(session, n: int) -> np.ndarray:
    return session.preprocess((SAMPLES * (n // len(SAMPLES) + 1))[:n])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_builds_validates_and_matches_onnxruntime(artifact, built, precision, trt_version):
    for entry in built[precision]:
        assert entry["validation"]["passed"], entry["validation"]
        assert entry["tensorrt_version"] == trt_version and (artifact / entry["file"]).is_file()
        assert entry["profile"] and entry["build_seconds"] > 0 and entry["bytes"] > 0
    engine = clipdeploy.load(artifact, backend="tensorrt", precision=precision)
    reference = clipdeploy.load(artifact, backend="onnxruntime", precision=precision)
    tol = TOLERANCES[precision]
    for tower, ours, theirs in (
        ("image", engine.encode_image(SAMPLES), reference.encode_image(SAMPLES)),
        (
            "text",
            engine.encode_text(["a photo of a cat", "a red car", ""]),
            reference.encode_text(["a photo of a cat", "a red car", ""]),
        ),
    ):
        c = compare(ours, theirs)
        assert c.min_cosine >= tol.min_cosine, f"{precision} {tower}: min cosine {c.min_cosine:.6f} < {tol.min_cosine}"


def test_timing_cache_is_saved_and_reused(artifact, built):
    cache = artifact.parent / "timing.cache"
    size = cache.stat().st_size
    assert size > 0
    build_engines(BuildConfig(artifact, precision="fp32", batch=(1, 4, 16), timing_cache=cache, validate=False))
    assert cache.stat().st_size >= size


def test_batches_over_the_profile_max_are_split(artifact, built):
    s = clipdeploy.load(artifact, backend="tensorrt", precision="fp32")
    assert s.runners["image"].max_batch == 16
    x = _pixels(s, 40)
    whole = s.encode_pixels(x)
    parts = np.concatenate([s.encode_pixels(x[i : i + 8]) for i in range(0, 40, 8)])
    np.testing.assert_allclose(whole, parts, rtol=1e-4, atol=1e-5)


def test_threads_share_one_engine_with_their_own_contexts(artifact, built):
    s = clipdeploy.load(artifact, backend="tensorrt", precision="fp16")
    x = _pixels(s, 16)
    want = {n: s.encode_pixels(x[:n]) for n in (1, 5, 16)}
    errors = []

    def work(k: int) -> None:
        try:
            for i in range(20):
                n = (1, 5, 16)[(k + i) % 3]
                if not np.allclose(s.encode_pixels(x[:n]), want[n], rtol=1e-5, atol=1e-6):
                    errors.append(f"thread {k} call {i} batch {n}")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"thread {k}: {e}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(s.runners["image"]._states) >= 2


def test_cuda_graphs_match_plain_runs(artifact, built):
    plain = clipdeploy.load(artifact, backend="tensorrt", precision="fp16")
    graphs = clipdeploy.load(artifact, backend="tensorrt", precision="fp16", cuda_graphs=True)
    x = _pixels(plain, 16)
    for n in (1, 3, 8, 13, 16, 3, 13):
        np.testing.assert_allclose(graphs.encode_pixels(x[:n]), plain.encode_pixels(x[:n]), rtol=1e-3, atol=1e-4)
    captured = graphs.runners["image"]._local.state.graphs
    assert captured and all(g is not None for g in captured.values()), "a CUDA graph capture failed"


def test_torch_cuda_tensors_run_in_place(artifact, built):
    torch = pytest.importorskip("torch")
    s = clipdeploy.load(artifact, backend="tensorrt", precision="fp16")
    x = _pixels(s, 6)
    out = s.encode_pixels(torch.from_numpy(x).cuda(), return_torch=True)
    assert out.is_cuda and out.shape == (6, s.embed_dim)
    np.testing.assert_allclose(out.cpu().numpy(), s.encode_pixels(x), rtol=1e-3, atol=1e-4)
    ids = torch.from_numpy(s.tokenize(["a cat", "a dog"])).cuda()
    np.testing.assert_allclose(s.encode_tokens(ids), s.encode_text(["a cat", "a dog"]), rtol=1e-3, atol=1e-4)


def test_sequence_profile_of_a_dynamic_length_text_tower(trt_version, tiny_artifact):
    from tests.support.tiny_artifact import expected

    (entry,) = build_engines(
        BuildConfig(tiny_artifact, towers=("text",), shapes={"sequence": (2, 8, 16)}, batch=(1, 4, 8))
    )
    assert entry["profile"]["input_ids"] == {"min": [1, 2], "opt": [4, 8], "max": [8, 16]}
    from clipdeploy.runtime.backends.tensorrt import TrtOptions, TrtRunner

    runner = TrtRunner(tiny_artifact / entry["file"], TrtOptions(), axis_names={"input_ids": ["batch", "sequence"]})
    ids = np.random.default_rng(0).integers(0, 49408, (3, 10), dtype=np.int64)
    np.testing.assert_allclose(runner.infer({"input_ids": ids})["text_embeds"], expected(ids), rtol=1e-3)
    with pytest.raises(InputError, match="sequence 77, outside the engine's profile 2..16"):
        runner.infer({"input_ids": np.zeros((1, 77), np.int64)})
    runner.close()


def test_engines_from_another_gpu_or_version_are_refused(artifact, built, tmp_path):
    art = Path(shutil.copytree(artifact, tmp_path / "moved"))
    m = json.loads((art / "manifest.json").read_text())
    for v in m["variants"]:
        if v["format"] == "tensorrt":
            v["compute_capability"], v["gpu"] = "1.0", "an old GPU"
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="compute capability 1.0.*rebuild it here"):
        clipdeploy.load(art, backend="tensorrt")
    assert clipdeploy.load(art).backend == auto_cpu_backend()  # engines that do not fit: the CPU rule
    from clipdeploy.runtime import cuda

    for v in m["variants"]:
        if v["format"] == "tensorrt":
            v["compute_capability"], v["tensorrt_version"] = cuda.gpu_info(0).cc, "9.0.0"
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="TensorRT 9.0.0"):
        clipdeploy.load(art, backend="tensorrt")


def test_version_compatible_plans_need_the_host_code_opt_in(trt_version, micro_artifact, tmp_path):
    art = Path(shutil.copytree(micro_artifact.path, tmp_path / "vc"))
    entries = build_engines(BuildConfig(art, version_compat=True, batch=(1, 2, 4)))
    assert all(e["version_compatible"] and e["file"].endswith("-vc.plan") for e in entries)
    with pytest.raises(EngineError, match="engine_host_code_allowed=True"):
        clipdeploy.load(art, backend="tensorrt")
    s = clipdeploy.load(art, backend="tensorrt", engine_host_code_allowed=True)
    assert s.encode_image(SAMPLES[:2]).shape == (2, s.embed_dim)


def test_hardware_compatible_plans_build_and_run(trt_version, micro_artifact, tmp_path):
    from clipdeploy.runtime import cuda

    if cuda.gpu_info(0).compute_capability < (8, 0):
        pytest.skip("hardware compatibility (ampere-plus) needs an Ampere or newer GPU")
    art = Path(shutil.copytree(micro_artifact.path, tmp_path / "hc"))
    entries = build_engines(BuildConfig(art, hardware_compat="ampere-plus", batch=(1, 2, 4)))
    assert all(".ampere-plus." in e["file"] and e["validation"]["passed"] for e in entries)


def test_parser_errors_name_the_node(trt_version, tiny_artifact):
    import onnx
    from onnx import TensorProto, helper

    from clipdeploy.artifact.manifest import file_sha256

    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["pixel_values"], ["image_embeds"], name="mystery_node", domain="com.example")],
        "bad",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["batch", 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)])
    onnx.save(model, tiny_artifact / "image.fp32.onnx")
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    for v in m["variants"]:
        if v["file"] == "image.fp32.onnx":
            v["sha256"] = file_sha256(tiny_artifact / "image.fp32.onnx")
    (tiny_artifact / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="mystery_node.*Frobnicate"):
        build_engines(BuildConfig(tiny_artifact, towers=("image",)))


def test_validate_command_records_figures(artifact, built, capsys):
    from clipdeploy.cli import main

    assert main(["validate", str(artifact), "--precision", "fp16"]) == 0
    assert capsys.readouterr().out.count(": pass") == 2
    report = validate_engines(artifact, precision="fp32")
    m = json.loads((artifact / "manifest.json").read_text())
    for v in m["variants"]:
        if v["file"] in report:
            assert v["validation"]["gpu"] and v["validation"]["passed"]


def test_saved_results_of_real_engines_compare_without_tensorrt(artifact, built, tmp_path, capsys):
    """--save-results on real engines, then --load-results (ONNX Runtime only) agrees with the live validation."""
    pytest.importorskip("polygraphy")
    from clipdeploy.cli import main
    from clipdeploy.engines.validate import compare_saved

    results = tmp_path / "results.json"
    live = validate_engines(artifact, precision="fp16", save_results=results)
    saved = compare_saved(artifact, results)
    assert sorted(saved) == sorted(live)
    for file, record in saved.items():
        assert record["passed"] and record["min_cosine"] == pytest.approx(live[file]["min_cosine"], abs=1e-9)
        assert record["polygraphy"] == live[file]["polygraphy"]
    assert main(["validate", str(artifact), "--load-results", str(results)]) == 0
    assert capsys.readouterr().out.count(": pass") == 2
