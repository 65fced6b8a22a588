"""The precision stage on models that behave like real ones: a micro CLIP trained on captioned shapes,
the same model with planted outlier channels, and real photographs."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

import clipdeploy  # noqa: E402
from clipdeploy.errors import AccuracyError, CalibrationError, UsageError  # noqa: E402
from clipdeploy.export.config import ExportConfig  # noqa: E402
from clipdeploy.export.exporter import export_model  # noqa: E402
from clipdeploy.artifact.manifest import read_manifest  # noqa: E402
from clipdeploy.quantize import fp16 as fp16_pass  # noqa: E402
from clipdeploy.quantize import graph  # noqa: E402
from clipdeploy.quantize.config import QuantizeConfig  # noqa: E402
from clipdeploy.quantize.stage import quantize  # noqa: E402
from clipdeploy.validation import cosine_rows  # noqa: E402

from tests.support import synthetic  # noqa: E402
from tests.support.cpus import auto_cpu_backend, use_cpu  # noqa: E402
from tests.support.models import MODELS  # noqa: E402


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Rendered calibration/held-out images, their captions, and the class prompts of the gate."""
    root = tmp_path_factory.mktemp("shapes")
    synthetic.write_dataset(root / "images", 360, seed=5)
    rng = np.random.default_rng(6)
    captions = [synthetic.caption(synthetic.draw(rng)[1], rng) for _ in range(400)]
    (root / "captions.txt").write_text("\n".join(captions))
    (root / "prompts.txt").write_text("\n".join(synthetic.class_prompts()))
    return root


def _export(tmp: Path, state: dict | None, name: str) -> Path:
    ckpt = synthetic.trained_checkpoint()
    if state is not None:
        ckpt = tmp / f"{name}.pt"
        torch.save(state, ckpt)
    out = tmp / name
    export_model(ExportConfig(model=synthetic.MODEL_NAME, output=out, checkpoint=ckpt,
                              model_config=synthetic.config_file(tmp)))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("trained"), None, "trained")


def _state() -> dict:
    return torch.load(synthetic.trained_checkpoint(), weights_only=True)


def _cfg(artifact: Path, shapes: Path, precision: str, **kw) -> QuantizeConfig:
    defaults = dict(calib_images=[shapes / "images"], calib_texts=shapes / "captions.txt",
                    gate_prompts=shapes / "prompts.txt", samples=200, holdout=96, threads=2)
    return QuantizeConfig(artifact=artifact, precision=precision, **{**defaults, **kw})


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


# ---- the variants on a trained model ---------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp16", "int8", "int8-fp16"])
def test_variant_passes_its_gate_on_a_trained_model(trained, shapes, tmp_path, precision):
    trained = _copy(trained, tmp_path)  # the fixture is shared: later tests must not find this variant
    report = quantize(_cfg(trained, shapes, precision, force=True))
    print(f"{precision}: image {report['image']}, text {report['text']}, top-1 {report['top1_agreement']}")
    assert report["passed"], report["failures"]
    assert report["top1_enforced"] is True  # a trained checkpoint: top-1 means something
    assert report["top1_agreement"] >= MODELS[synthetic.MODEL_NAME].expected["min_top1_agreement"]
    m = read_manifest(trained)
    entries = [v for v in m["variants"] if v["precision"] == precision]
    assert {v["tower"] for v in entries} == {"image", "text"}
    assert all(v["validation"]["passed"] for v in entries)
    assert m["validation"]["quantize"][precision]["data"]["image"]["calibration"] == 200
    # A dynamic-length text tower is gated as the runtime runs it: prompts padded to the longest one.
    assert m["towers"]["text"]["padding"] == "longest"
    assert m["validation"]["quantize"][precision]["data"]["gate_text_length"] < m["towers"]["text"]["context_length"]
    # The runtime runs it with the same feeds and output types as fp32.
    fp32 = clipdeploy.load(trained, precision="fp32")
    variant = clipdeploy.load(trained, precision=precision)
    images = sorted((shapes / "images").glob("*.jpg"))[-12:]
    a, b = fp32.encode_image(images), variant.encode_image(images)
    assert b.dtype == np.float32 and b.shape == a.shape
    assert cosine_rows(a, b).min() > 0.98
    t = variant.encode_text(["a large red circle on the left", "a blue square"])
    assert t.dtype == np.float32 and np.all(np.isfinite(t))


@pytest.mark.parametrize("precision", ["int8", "int8-fp16"])
def test_int8_defaults_meet_the_worst_case_floor_on_the_trained_model(trained, shapes, tmp_path, precision, capsys):
    """Defaults throughout (300 to calibrate, 256 held out, no held-out sample below cosine 0.95),
    through the CLI: 360 images are shared 180/180, and the worst samples are named and kept."""
    from clipdeploy.cli import main

    artifact = _copy(trained, tmp_path)
    code = main(["quantize", str(artifact), "--precision", precision, "--calib-images", str(shapes / "images"),
                 "--calib-texts", str(shapes / "captions.txt"), "--gate-prompts", str(shapes / "prompts.txt"),
                 "--threads", "2"])
    printed = capsys.readouterr().out
    print(printed)
    assert code == 0
    report = read_manifest(artifact)["validation"]["quantize"][precision]
    assert report["thresholds"]["min_cosine"] == 0.95 and report["passed"]
    data = report["data"]["image"]
    assert (data["calibration"], data["held_out"]) == (180, 180)
    assert data["asked"] == {"calibration": 300, "held_out": 256}
    for tower in ("image", "text"):
        r = report[tower]
        assert r["min_cosine"] >= 0.95 and r["min_cosine"] <= r["p1_cosine"] <= r["p5_cosine"] <= r["mean_cosine"]
        assert len(r["worst"]) == 5 and r["worst"][0]["cosine"] == r["min_cosine"]
    worst_image = report["image"]["worst"][0]["sample"]
    assert Path(worst_image).parent == shapes / "images" and Path(worst_image).is_file()
    captions = (shapes / "captions.txt").read_text().splitlines()
    assert report["text"]["worst"][0]["sample"] in captions
    assert f"worst: {worst_image} " in printed and "p1 " in printed
    variant = next(v for v in read_manifest(artifact)["variants"] if v["precision"] == precision)
    assert variant["validation"]["worst"][0]["sample"] == report[variant["tower"]]["worst"][0]["sample"]


def test_runtime_picks_int8_on_cpu_and_says_so(trained, shapes, monkeypatch, tmp_path):
    quantize(_cfg(trained, shapes, "int8", force=True))
    session = clipdeploy.load(trained)
    picked = auto_cpu_backend()  # ONNX Runtime, or OpenVINO where it is installed on a CPU with VNNI
    assert session.backend == picked and session.precision == {"image": "int8", "text": "int8"}
    assert f"int8 onnx on {picked} (" in session.describe(), session.describe()
    for kind in ("avx2", "amx"):  # both branches of the rule, on any machine
        use_cpu(monkeypatch, tmp_path, kind)
        session = clipdeploy.load(trained)
        assert session.backend == auto_cpu_backend() and session.precision == {"image": "int8", "text": "int8"}
        if session.backend == "onnxruntime":
            how = "VNNI int8 kernels" if kind == "amx" else "exact U8U8 int8"
            assert f"int8 onnx on onnxruntime (CPUExecutionProvider, {how}" in session.describe(), session.describe()


def _graph(path: Path):
    model = onnx.load(str(path))
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return model, producers, inits


def test_int8_graph_is_tensorrt_style_qdq(trained, shapes):
    quantize(_cfg(trained, shapes, "int8", force=True))
    model, producers, inits = _graph(trained / "image.int8.onnx")
    nodes = model.graph.node
    qs = [n for n in nodes if n.op_type == "QuantizeLinear"]
    assert qs
    for q in qs:
        zp = inits[q.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), "symmetric int8 with zero-point 0"
    for n in nodes:
        if n.op_type in ("MatMul", "Gemm", "Conv"):
            dqs = [producers.get(i) for i in n.input[:2]]
            assert all(d is not None and d.op_type == "DequantizeLinear" for d in dqs), n.name
            for dq in dqs:
                q = producers.get(dq.input[0])
                if q is not None and q.input[0] in inits:  # a weight: per-channel on the output axis
                    assert inits[dq.input[1]].size == inits[q.input[0]].shape[_axis(dq)] > 1, n.name
            if len(n.input) > 2:  # bias stays float
                assert producers.get(n.input[2]) is None or producers[n.input[2]].op_type != "DequantizeLinear"
        if n.op_type in ("Softmax", "LayerNormalization"):
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in n.input), n.name
    outputs = {o.name for o in model.graph.output}
    assert not any(producers[o].op_type == "DequantizeLinear" for o in outputs), "no Q/DQ on outputs"
    assert not any(v.dtype == np.int32 for v in inits.values()), "no bias quantization"


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def test_fp16_keeps_layernorm_and_io_types(trained, shapes):
    quantize(_cfg(trained, shapes, "fp16", force=True))
    for tower, in_type in (("image", onnx.TensorProto.FLOAT), ("text", onnx.TensorProto.INT64)):
        model, producers, inits = _graph(trained / f"{tower}.fp16.onnx")
        assert model.graph.input[0].type.tensor_type.elem_type == in_type
        assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
        for n in model.graph.node:
            if n.op_type == "LayerNormalization":
                assert types.get(n.input[0], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT, n.name
        assert any(v.dtype == np.float16 for v in inits.values())


@pytest.mark.parametrize("precision", ["fp16", "int8-fp16"])
def test_token_ids_never_pass_through_a_float_type(trained, shapes, precision):
    quantize(_cfg(trained, shapes, precision, force=True))
    model, producers, _ = _graph(trained / f"text.{precision}.onnx")
    ids = model.graph.input[0].name
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    for n in model.graph.node:
        if ids in n.input:
            assert n.op_type != "Cast", f"{n.name} casts the token ids"
        if n.op_type == "ArgMax":
            assert n.input[0] == ids or producers[n.input[0]].op_type != "Cast"


def test_int8_fp16_feeds_fp16_matmuls_straight_from_dequantize(trained, shapes):
    quantize(_cfg(trained, shapes, "int8-fp16", force=True))
    model, producers, inits = _graph(trained / "image.int8-fp16.onnx")
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear":
            assert inits[n.input[1]].dtype == np.float16
        if n.op_type in ("MatMul", "Gemm", "Conv"):
            assert producers[n.input[0]].op_type == "DequantizeLinear", n.name


# ---- recovery and range ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outliers(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("outliers"), synthetic.plant_outliers(_state()), "outliers")


def test_planted_outliers_fail_plain_int8_and_recover(outliers, shapes, tmp_path):
    artifact = _copy(outliers, tmp_path)
    with pytest.raises(AccuracyError) as info:
        quantize(_cfg(artifact, shapes, "int8", recover=False))
    plain = info.value.report
    print("plain int8:", plain["failures"])
    assert not plain["passed"]
    assert not any(v["precision"] == "int8" for v in read_manifest(artifact)["variants"])
    assert not (artifact / "image.int8.onnx").exists()

    report = quantize(_cfg(artifact, shapes, "int8"))
    rec = report["recovery"]
    kept = rec["kept_in_higher_precision"]["image"]
    print("recovered:", report["image"], report["top1_agreement"], kept, rec["speed_cost_batch8"])
    assert report["passed"]
    bound = rec["quantizable_nodes_bound"]["image"]
    assert 1 <= len(kept) <= bound
    # The node kept is the one that reads the planted channels: block 1's first MLP MatMul.
    assert [n["module"] for n in kept] == ["visual.transformer.resblocks.1.mlp.c_fc"], kept
    assert rec["speed_cost_batch8"]["image"]["slowdown"] > 0


def test_min_cosine_failure_alone_triggers_recovery_that_fixes_it(outliers, shapes, tmp_path):
    artifact = _copy(outliers, tmp_path)
    only_floor = dict(min_mean_cosine=0.0, min_top1=0.0)  # the per-sample floor (default 0.95) is the only gate
    with pytest.raises(AccuracyError, match=r"image min cosine .* < 0.95 \(worst: .*\.jpg\)") as info:
        quantize(_cfg(artifact, shapes, "int8", recover=False, **only_floor))
    assert all("min cosine" in f for f in info.value.report["failures"])
    report = quantize(_cfg(artifact, shapes, "int8", **only_floor))
    assert report["passed"] and report["image"]["min_cosine"] >= 0.95
    assert report["recovery"]["kept_in_higher_precision"]["image"]
    assert report["recovery"]["ranking"]["image"]["feeds"] >= 16


def test_a_recovered_variant_with_external_data_loads(outliers, shapes, tmp_path, monkeypatch):
    """A recovery round's file names its own side file (`.r1.onnx.data`); recorded under the variant's
    name, the location inside the ONNX file must name the side file beside it, or load refuses it."""
    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 0)  # every graph goes to external data, as >1.5 GB ones do
    artifact = _copy(outliers, tmp_path)
    report = quantize(_cfg(artifact, shapes, "int8", min_mean_cosine=0.0, min_top1=0.0))
    assert report["recovery"]["kept_in_higher_precision"]["image"]
    assert (artifact / "image.int8.onnx.data").is_file()
    session = clipdeploy.load(artifact, precision="int8")  # the side file's location is checked here
    image = sorted((shapes / "images").rglob("*.jpg"))[0]
    emb = session.encode_image([image])
    assert emb.shape[0] == 1 and np.isfinite(emb).all()


def test_recovery_is_bounded(outliers, shapes, tmp_path):
    artifact = _copy(outliers, tmp_path)
    with pytest.raises(AccuracyError) as info:
        quantize(_cfg(artifact, shapes, "int8", max_fp32_fraction=0.0))
    assert "exhausted" in info.value.report["recovery"]
    assert not any(v["precision"] == "int8" for v in read_manifest(artifact)["variants"])


def test_fp16_keeps_out_of_range_nodes_in_fp32(tmp_path, shapes, monkeypatch):
    from clipdeploy.quantize import graph

    hot = synthetic.plant_outliers(_state(), channels=(5,), factor=40000.0)  # LayerNorm output ~1e5
    artifact = _export(tmp_path, hot, "hot")
    report = quantize(_cfg(artifact, shapes, "fp16"))
    kept = report["build"]["image"]["fp16"]["fp32_nodes_for_range"]
    assert kept, "nodes beyond the fp16 range must stay in fp32"
    assert report["passed"] and report["image"]["min_cosine"] >= 0.999
    session = clipdeploy.load(artifact, precision="fp32")
    feeds = [{"pixel_values": session.preprocess(sorted((shapes / "images").glob("*.jpg"))[:8])}]
    inside = graph.abs_max(artifact / "image.fp16.onnx", feeds)
    assert all(np.isfinite(v) for v in inside.values()), "no intermediate value may overflow"
    # Without the range check, the same conversion overflows inside the graph.
    monkeypatch.setattr(fp16_pass, "RANGE_MARGIN", 1e9)
    fp16_pass.convert(artifact / "image.fp32.onnx", tmp_path / "naive.onnx", feeds)
    naive = graph.abs_max(tmp_path / "naive.onnx", feeds)
    assert any(not np.isfinite(v) for v in naive.values())


# ---- the gate ------------------------------------------------------------------------------------------


def test_failed_gate_writes_no_variant_and_records_figures(trained, shapes, tmp_path):
    artifact = _copy(trained, tmp_path)
    for v in [v for v in read_manifest(artifact)["variants"] if v["precision"] != "fp32"]:
        (artifact / v["file"]).unlink()
    m = read_manifest(artifact)
    m["variants"] = [v for v in m["variants"] if v["precision"] == "fp32"]
    (artifact / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(AccuracyError, match="mean cosine .* < 1.0"):
        quantize(_cfg(artifact, shapes, "int8", min_mean_cosine=1.0, recover=False))
    m = read_manifest(artifact)
    assert [v["precision"] for v in m["variants"]] == ["fp32", "fp32"]
    assert m["validation"]["quantize"]["int8"]["passed"] is False
    assert not list(artifact.glob("*.int8.onnx")) and not list(artifact.glob(".quantize-*"))


def test_cli_failed_gate_prints_the_worst_samples_then_one_error_line(trained, shapes, tmp_path, capsys):
    from clipdeploy.cli import main

    artifact = _copy(trained, tmp_path)
    code = main(["quantize", str(artifact), "--precision", "int8", "--calib-images", str(shapes / "images"),
                 "--calib-texts", str(shapes / "captions.txt"), "--gate-prompts", str(shapes / "prompts.txt"),
                 "--samples", "32", "--holdout", "32", "--min-cosine", "1.0", "--no-recover", "--force"])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 1 and not captured.out
    assert err[-1].startswith("clipdeploy: error: int8 gate failed: image min cosine") and "(worst: " in err[-1]
    assert sum(line.startswith("clipdeploy: error:") for line in err) == 1
    worst = next(line for line in err if line.strip().startswith("worst:") and ".jpg" in line)
    assert str(shapes / "images") in worst
    assert any("int8: gate FAILED" in line for line in err)


def test_random_weights_record_top1_without_enforcing_it(shapes, tmp_path):
    from tests.support.testdata import MICRO_CONFIG

    artifact = tmp_path / "random"
    export_model(ExportConfig(model="micro-vit", output=artifact, model_config=MICRO_CONFIG))  # no weights given
    report = quantize(_cfg(artifact, shapes, "int8", gate_prompts=None, min_top1=1.0))
    assert report["passed"] and report["top1_enforced"] is False
    assert "not enforced" in report["top1_note"] and report["top1_prompts"] == 1000


def test_calibration_cache_is_reused(trained, shapes, tmp_path):
    artifact = _copy(trained, tmp_path)
    first = quantize(_cfg(artifact, shapes, "int8", force=True))
    second = quantize(_cfg(artifact, shapes, "int8", force=True))
    assert second["build"]["image"]["calibration_cache"]["file"] == first["build"]["image"]["calibration_cache"]["file"]
    assert second["build"]["image"]["calibration_cache"]["reused"] is True
    third = quantize(_cfg(artifact, shapes, "int8", force=True, seed=1))  # other samples, other statistics
    assert third["build"]["image"]["calibration_cache"]["file"] != first["build"]["image"]["calibration_cache"]["file"]


def test_existing_variant_needs_force(trained, shapes):
    quantize(_cfg(trained, shapes, "int8", force=True))
    with pytest.raises(UsageError, match="already has a int8 variant"):
        quantize(_cfg(trained, shapes, "int8"))


# ---- bad calibration data ------------------------------------------------------------------------------


def test_bad_calibration_inputs(trained, shapes, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match="found 0 images"):
        quantize(_cfg(trained, shapes, "int8", calib_images=[empty], force=True))
    with pytest.raises(UsageError, match="does not exist"):
        quantize(_cfg(trained, shapes, "int8", calib_images=[tmp_path / "nope"], force=True))
    with pytest.raises(CalibrationError, match="pass --calib-images"):
        quantize(_cfg(trained, shapes, "int8", calib_images=[], force=True))
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted((shapes / "images").glob("*.jpg"))[:20]:
        shutil.copy(p, few)
    with pytest.raises(CalibrationError, match=r"found 20 usable images, need at least 64 \(32 held out"):
        quantize(_cfg(trained, shapes, "int8", calib_images=[few], force=True))
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(CalibrationError, match="found 0 captions"):
        quantize(_cfg(trained, shapes, "int8", calib_texts=tmp_path / "blank.txt", force=True))


def test_unreadable_files_are_skipped_and_counted(trained, shapes, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(shapes / "images", mixed)
    for i in range(5):
        (mixed / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    artifact = _copy(trained, tmp_path)
    report = quantize(_cfg(artifact, shapes, "int8", calib_images=[mixed], samples=262, force=True))
    assert report["data"]["image"]["skipped"] == 5
    assert any("broken" in e for e in report["data"]["image"]["skipped_examples"])
    with pytest.raises(CalibrationError, match=r"found 40 usable images of 45 \(5 unreadable\)"):
        few = tmp_path / "few-broken"
        few.mkdir()
        for p in sorted(mixed.glob("0*.jpg"))[:40] + sorted(mixed.glob("broken*")):
            shutil.copy(p, few)
        quantize(_cfg(artifact, shapes, "int8", calib_images=[few], holdout=32, samples=32, min_samples=12, force=True))


def test_tar_shards_are_a_source(trained, shapes, tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for p in sorted((shapes / "images").glob("*.jpg")):
            tar.add(p, arcname=f"sample/{p.name}")
            cap = tmp_path / f"{p.stem}.txt"
            cap.write_text("a caption")
            tar.add(cap, arcname=f"sample/{p.stem}.txt")  # webdataset keeps captions beside images
    artifact = _copy(trained, tmp_path)
    report = quantize(_cfg(artifact, shapes, "int8", calib_images=[shard], force=True))
    assert report["passed"] and report["data"]["image"]["found"] == 360


def test_cli_quantize_errors_are_one_line(trained, tmp_path, capsys):
    from clipdeploy.cli import main

    code = main(["quantize", str(trained), "--precision", "int8", "--force"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--calib-images" in err[0]
    code = main(["quantize", str(trained), "--precision", "int8", "--force", "--calib-images", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not exist" in err[0]
