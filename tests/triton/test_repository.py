"""`clipdeploy triton`: every config.pbtxt parses with Triton's own protobuf, the ensembles are wired right,
and the Python models turn bytes and strings into the runtime's embeddings (run against a stand-in for
triton_python_backend_utils, since no Triton server runs here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.support.triton_helpers import add_engine, add_onnx_copy, all_configs, copy_artifact, run_ensemble

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc]: pip install -e '.[dev]'")

import clipdeploy  # noqa: E402
from clipdeploy.cli import main  # noqa: E402
from clipdeploy.errors import UsageError  # noqa: E402
from clipdeploy.triton.config import TritonConfig  # noqa: E402
from clipdeploy.triton.repository import MARKER, build_repository  # noqa: E402

IMAGES = sorted((Path(clipdeploy.__file__).parent / "data" / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def gpu_artifact(micro_artifact, tmp_path_factory) -> Path:
    """The micro artifact with stand-in fp16 engines: H100 and A100 plans of each tower."""
    root = copy_artifact(micro_artifact.path, tmp_path_factory.mktemp("gpu") / "micro")
    for tower in ("image", "text"):
        add_engine(root, tower, cc="9.0")
        add_engine(root, tower, cc="8.0", batch=(1, 8, 16))
    return root


@pytest.fixture(scope="module")
def repo(gpu_artifact, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("repo") / "models"
    return out, build_repository(TritonConfig(artifacts=[gpu_artifact], output=out, triton_release="25.10"))


def _dtype_dims(t) -> tuple[int, list[int]]:
    return t.data_type, list(t.dims)


def test_every_config_parses_with_tritons_protobuf(repo):
    out, summary = repo
    configs = all_configs(out)
    names = set(configs)
    assert names == {p.name for p in out.iterdir() if p.is_dir()}
    assert names == {
        "micro_image_fp32_onnx", "micro_text_fp32_onnx", "micro_image_fp16_trt", "micro_text_fp16_trt",
        "micro_preprocess", "micro_tokenize", "micro_normalize_image", "micro_normalize_text",
        "micro_embed_image_fp32_onnx", "micro_embed_image_fp16_trt", "micro_embed_image",
        "micro_embed_text_fp32_onnx", "micro_embed_text_fp16_trt", "micro_embed_text",
    }  # fmt: skip
    for name, cfg in configs.items():
        assert cfg.name == name
        assert (out / name / "1").is_dir()


def test_tower_models(repo):
    out, _ = repo
    configs = all_configs(out)
    from tritonclient.grpc import model_config_pb2 as pb

    trt = configs["micro_image_fp16_trt"]
    assert trt.platform == "tensorrt_plan"
    assert trt.max_batch_size == 16  # the smaller profile maximum of the two plans
    (inp,) = trt.input
    assert (inp.name, inp.data_type, list(inp.dims)) == ("pixel_values", pb.TYPE_FP32, [3, 64, 64])
    (o,) = trt.output
    assert (o.name, list(o.dims)) == ("image_embeds", [64])
    assert trt.HasField("dynamic_batching") and trt.dynamic_batching.max_queue_delay_microseconds == 100
    (group,) = trt.instance_group
    assert group.kind == pb.ModelInstanceGroup.KIND_GPU and group.count == 1
    assert dict(trt.cc_model_filenames) == {
        "8.0": "image.fp16.sm80.trt10.13.3.plan",
        "9.0": "image.fp16.sm90.trt10.13.3.plan",
    }
    for plan in trt.cc_model_filenames.values():
        assert (out / "micro_image_fp16_trt" / "1" / plan).is_file()
    text = configs["micro_text_fp16_trt"]
    assert list(text.input[0].dims) == [-1] and text.input[0].data_type == pb.TYPE_INT64  # dynamic sequence
    onnx = configs["micro_image_fp32_onnx"]
    assert onnx.platform == "onnxruntime_onnx" and onnx.max_batch_size == 64
    assert onnx.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert (out / "micro_image_fp32_onnx" / "1" / onnx.default_model_filename).is_file()
    pre = configs["micro_preprocess"]
    assert pre.backend == "python" and pre.input[0].data_type == pb.TYPE_STRING and list(pre.input[0].dims) == [1]
    assert list(pre.output[0].dims) == [3, 64, 64] and pre.max_batch_size == 64
    for py in ("micro_preprocess", "micro_tokenize"):
        version = out / py / "1"
        assert (version / "model.py").is_file() and (version / "assets" / "clipdeploy.json").is_file()
        assert (version / "clipdeploy" / "runtime" / "preprocess.py").is_file()
    assert (out / "micro_tokenize" / "1" / "assets" / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz").is_file()


def test_ensembles_are_wired_end_to_end(repo):
    out, summary = repo
    configs = all_configs(out)
    ensembles = {n: c for n, c in configs.items() if c.platform == "ensemble"}
    assert len(ensembles) == 6
    for name, ens in ensembles.items():
        tensors = {t.name: _dtype_dims(t) for t in ens.input}
        assert len(tensors) == 1 and next(iter(tensors.values()))[1] == [1]
        for step in ens.ensemble_scheduling.step:
            model = configs[step.model_name]  # every step names a model in the repository
            assert ens.max_batch_size <= model.max_batch_size, (name, step.model_name)
            model_in = {t.name: _dtype_dims(t) for t in model.input}
            model_out = {t.name: _dtype_dims(t) for t in model.output}
            assert set(step.input_map) == set(model_in), (name, step.model_name)
            for key, tensor in step.input_map.items():
                assert tensor in tensors, f"{name}: {tensor} is used before any step makes it"
                assert tensors[tensor] == model_in[key], (name, step.model_name, key)
            for key, tensor in step.output_map.items():
                assert key in model_out, (name, step.model_name, key)
                tensors[tensor] = model_out[key]
        for o in ens.output:
            assert tensors[o.name] == _dtype_dims(o), name
    default = ensembles["micro_embed_image"].ensemble_scheduling.step[1].model_name
    assert default == "micro_image_fp16_trt"  # TensorRT first, as the runtime picks
    listed = {e["name"] for a in summary["artifacts"] for e in a["ensembles"]}
    assert listed == set(ensembles)


def test_python_models_match_the_runtime(micro_artifact, tmp_path):
    out = tmp_path / "repo"
    build_repository(TritonConfig(artifacts=[micro_artifact.path], output=out, names=("micro",)))
    session = clipdeploy.load(micro_artifact.path)
    batches = [IMAGES[:3], IMAGES[3:4]]
    got = run_ensemble(out, "micro_embed_image", batches, tmp_path)
    facts = got["facts"]
    assert [s["backend"] for s in facts["steps"]] == ["python", "onnxruntime_onnx", "python"]
    assert facts["clipdeploy_file"].startswith(str(out / "micro_preprocess" / "1")), facts
    assert facts["heavy"] == [], "the Python models must not import torch, open_clip, onnx or tensorrt"
    for i, batch in enumerate(batches):
        want = session.encode_image(batch)
        err = float(np.abs(got[f"out_{i}"] - want).max())
        assert got[f"out_{i}"].shape == want.shape and err < 1e-5, f"request {i}: max abs diff {err:.2e}"
    texts = [["a cat", "A red Motorcycle parked by the road!!", "café au lait"], [""], ["two dogs & a cat " * 20]]
    got = run_ensemble(out, "micro_embed_text", texts, tmp_path)
    assert got["facts"]["clipdeploy_file"].startswith(str(out / "micro_tokenize" / "1"))
    for i, batch in enumerate(texts):
        want = session.encode_text(batch)
        err = float(np.abs(got[f"out_{i}"] - want).max())
        assert err < 1e-5, f"text request {i}: max abs diff {err:.2e}"


def test_a_bad_image_fails_its_own_request_only(micro_artifact, tmp_path):
    out = tmp_path / "repo"
    build_repository(TritonConfig(artifacts=[micro_artifact.path], output=out, names=("clip",)))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    got = run_ensemble(out, "clip_embed_image", [[IMAGES[0]], [broken], [IMAGES[1]]], tmp_path)
    assert "out_0" in got and "out_2" in got and "out_1" not in got
    assert "image" in str(got["err_1"]), f"the bad request carries the runtime's error: {got['err_1']}"


def test_tensorrt_release_checks(gpu_artifact, tmp_path):
    def build(**kw):
        return build_repository(TritonConfig(artifacts=[gpu_artifact], output=tmp_path / "r", force=True, **kw))

    summary = build(triton_release="25.08")  # TensorRT 10.13.2: these 10.13.3 plans do not load there
    assert any("will not load in Triton 25.08" in w for w in summary["warnings"]), summary["warnings"]
    assert [r["release"] for r in summary["tensorrt"]["matching_releases"]] == ["25.09", "25.10"]
    summary = build(triton_release="25.10")
    assert not any("will not load" in w for w in summary["warnings"])
    assert any("not verified" in w for w in summary["warnings"])
    summary = build(triton_release="26.02")
    assert any("not in clipdeploy's table" in w for w in summary["warnings"])
    summary = build(triton_release="26.02", triton_tensorrt="10.13.3")
    assert not any("will not load" in w or "not in clipdeploy" in w for w in summary["warnings"])
    readme = (tmp_path / "r" / "README.md").read_text()
    assert "nvcr.io/nvidia/tritonserver:26.02-py3" in readme and "--gpus all" in readme


def test_engines_of_several_tensorrt_versions_need_a_choice(gpu_artifact, tmp_path):
    root = copy_artifact(gpu_artifact, tmp_path / "mixed")
    add_engine(root, "image", cc="9.0", version="11.4.0")
    with pytest.raises(UsageError, match="TensorRT 10.13.3, 11.4.0.*--tensorrt-version"):
        build_repository(TritonConfig(artifacts=[root], output=tmp_path / "a"))
    summary = build_repository(TritonConfig(artifacts=[root], output=tmp_path / "b", tensorrt_version="11.4"))
    (art,) = summary["artifacts"]
    assert "mixed_image_fp16_trt" in art["models"] and "mixed_text_fp16_trt" not in art["models"]
    assert any("no Triton release in clipdeploy's table ships TensorRT 11.4.0" in w for w in summary["warnings"])


def test_what_is_left_out_and_why(micro_artifact, tmp_path):
    root = copy_artifact(micro_artifact.path, tmp_path / "art")
    add_engine(root, "image", validated=False)
    add_engine(root, "text", batch=(4, 8, 32), seq_max=32)
    add_onnx_copy(root, "image", "fp16")
    summary = build_repository(TritonConfig(artifacts=[root], output=tmp_path / "r"))
    warnings = "\n".join(summary["warnings"])
    assert "has not been through its accuracy check" in warnings and "clipdeploy validate" in warnings
    assert "takes batches of 4 and up" in warnings
    assert "takes at most 32 tokens" in warnings and "--seq-len 1:OPT:77" in warnings
    assert any("fp16 ONNX variants are left out" in n for n in summary["notes"])
    (art,) = summary["artifacts"]
    assert "art_image_fp16_trt" not in art["models"] and "art_image_fp16_onnx" not in art["models"]
    summary = build_repository(
        TritonConfig(artifacts=[root], output=tmp_path / "g", onnx_device="gpu", formats=("onnx",))
    )
    assert "art_image_fp16_onnx" in summary["artifacts"][0]["models"]
    gpu_default = all_configs(tmp_path / "g")["art_embed_image"].ensemble_scheduling.step[1].model_name
    assert gpu_default == "art_image_fp16_onnx"  # ONNX Runtime on CUDA prefers fp16, as the runtime does


def test_cpu_instances_serve_fp32_not_int8_unless_the_server_has_vnni(micro_artifact, tmp_path, capsys):
    """Triton's ONNX Runtime backend cannot set session.x64quantprecision, which int8 needs on CPUs without VNNI:
    CPU instance groups serve fp32 unless --server-has-vnni says the server's CPU does not need it."""
    root = copy_artifact(micro_artifact.path, tmp_path / "art")
    add_onnx_copy(root, "image", "int8")
    add_onnx_copy(root, "text", "int8")
    summary = build_repository(TritonConfig(artifacts=[root], output=tmp_path / "r"))
    (art,) = summary["artifacts"]
    assert "art_image_int8_onnx" not in art["models"] and "art_image_fp32_onnx" in art["models"]
    (note,) = [n for n in summary["notes"] if "int8 ONNX variants are left out on CPU" in n]
    assert "session.x64quantprecision" in note and "--server-has-vnni" in note
    for tower in ("image", "text"):
        default = all_configs(tmp_path / "r")[f"art_embed_{tower}"].ensemble_scheduling.step[1].model_name
        assert default == f"art_{tower}_fp32_onnx"
    # Asked for by name: refused in one line, nothing written.
    out = tmp_path / "asked"
    assert main(["triton", str(root), "-o", str(out), "--precision", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipdeploy: error: --precision int8 on --onnx-device cpu: ") and "\n" not in err, err
    assert "--server-has-vnni" in err and not out.exists()
    # The server's CPU has VNNI: int8 is served and is the default, as the runtime picks it on CPU.
    summary = build_repository(TritonConfig(artifacts=[root], output=tmp_path / "v", server_has_vnni=True))
    assert "art_image_int8_onnx" in summary["artifacts"][0]["models"]
    step = all_configs(tmp_path / "v")["art_embed_image"].ensemble_scheduling.step[1]
    assert step.model_name == "art_image_int8_onnx"
    assert main(["triton", str(root), "-o", str(out), "--precision", "int8", "--server-has-vnni"]) == 0
    # CUDA instances do not run the CPU kernels: int8 is served there as before (when asked for).
    gpu = build_repository(TritonConfig(artifacts=[root], output=tmp_path / "g", onnx_device="gpu",
                                        precisions=("int8",)))
    assert "art_image_int8_onnx" in gpu["artifacts"][0]["models"]


def test_an_artifact_without_tokenizer_files_gets_no_text_ensemble(micro_artifact, tmp_path):
    from clipdeploy.artifact.manifest import read_manifest, write_manifest

    root = copy_artifact(micro_artifact.path, tmp_path / "art")
    manifest = read_manifest(root)
    manifest["tokenizer"] = {"kind": "hf-tokenizers", "missing": {"hf_tokenizer_name": "x"}, "files": {}}
    write_manifest(root, manifest)
    summary = build_repository(TritonConfig(artifacts=[root], output=tmp_path / "r"))
    (art,) = summary["artifacts"]
    assert "art_text_fp32_onnx" in art["models"] and "art_tokenize" not in art["models"]
    assert {e["tower"] for e in art["ensembles"]} == {"image"}
    assert any("no tokenizer files" in w for w in summary["warnings"])


def test_output_safety_and_options(micro_artifact, tmp_path):
    out = tmp_path / "r"
    cfg = TritonConfig(artifacts=[micro_artifact.path], output=out)
    build_repository(cfg)
    assert json.loads((out / MARKER).read_text())["schema"] == "clipdeploy-triton/1"
    with pytest.raises(UsageError, match="already exists; pass --force"):
        build_repository(cfg)
    other = tmp_path / "not-a-repo"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not one"):
        build_repository(TritonConfig(artifacts=[micro_artifact.path], output=other, force=True))
    assert (other / "keep.txt").read_text() == "mine"
    with pytest.raises(UsageError, match="--name was given 2 times for 1"):
        build_repository(TritonConfig(artifacts=[micro_artifact.path], output=tmp_path / "x", names=("a", "b")))
    with pytest.raises(UsageError, match="would both be served as"):
        build_repository(TritonConfig(artifacts=[micro_artifact.path, micro_artifact.path], output=tmp_path / "y"))
    assert not list(tmp_path.glob(".y.tmp-*")), "a failed build leaves no temporary directory"


def test_cli(gpu_artifact, tmp_path, capsys):
    code = main(
        [
            "triton",
            str(gpu_artifact),
            "-o",
            str(tmp_path / "r"),
            "--triton-release",
            "25.08",
            "--instances",
            "2",
            "--format",
            "tensorrt",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "micro_embed_image" in captured.out and "(default)" in captured.out
    assert "warning: the engines were built with TensorRT 10.13.3 and will not load in Triton 25.08" in captured.err
    configs = all_configs(tmp_path / "r")
    assert configs["micro_image_fp16_trt"].instance_group[0].count == 2
    assert "micro_image_fp32_onnx" not in configs
    assert main(["triton", str(gpu_artifact), "-o", str(tmp_path / "s"), "--triton-release", "latest"]) == 2
    assert "is not a release name like 25.08" in capsys.readouterr().err


def test_fp8_engines_are_served_like_the_other_precisions(micro_artifact, tmp_path):
    """fp8 reaches Triton through the precision registry alone: its engines (compute capability 9.0 here)
    become tensorrt_plan models with their own ensembles, like fp16's."""
    root = copy_artifact(micro_artifact.path, tmp_path / "art")
    for tower in ("image", "text"):
        add_engine(root, tower, precision="fp8", cc="9.0")
    summary = build_repository(TritonConfig(artifacts=[root], output=tmp_path / "r"))
    (art,) = summary["artifacts"]
    configs = all_configs(tmp_path / "r")
    for tower in ("image", "text"):
        assert f"art_{tower}_fp8_trt" in art["models"]
        assert configs[f"art_{tower}_fp8_trt"].platform == "tensorrt_plan"
        assert f"art_embed_{tower}_fp8_trt" in configs
    only = build_repository(TritonConfig(artifacts=[root], output=tmp_path / "o", precisions=("fp8",)))
    assert {m for m in only["artifacts"][0]["models"] if m.endswith("_trt")} == {"art_image_fp8_trt", "art_text_fp8_trt"}
