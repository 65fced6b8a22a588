"""Export: validated ONNX that matches open_clip end to end, and refusals that leave nothing behind."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from clipdeploy.errors import AccuracyError, CheckpointError, UsageError
from clipdeploy.artifact.manifest import MANIFEST_NAME, file_sha256, read_manifest
from clipdeploy.validation import cosine_rows

from tests.support.testdata import HELD_OUT_TEXTS, MICRO_CONFIG, Exported

pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")

from clipdeploy.export.config import ExportConfig  # noqa: E402
from clipdeploy.export.exporter import export_model  # noqa: E402


def _reference(exp: Exported, images: list[Path], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    pixels = torch.stack([exp.preprocess(Image.open(p)) for p in images])
    with torch.inference_mode():
        img = exp.model.encode_image(pixels, normalize=True).numpy()
        txt = exp.model.encode_text(exp.tokenizer(texts), normalize=True).numpy()
    return img, txt


@pytest.mark.parametrize("fixture", ["vit_b_32_artifact", "rn50_artifact"])
def test_runtime_matches_open_clip_on_held_out_data(fixture, request, held_out_images):
    """The acceptance figure: torch-free runtime vs open_clip, unseen images and strings, cosine >= 0.99999."""
    import clipdeploy

    exp: Exported = request.getfixturevalue(fixture)
    session = clipdeploy.load(exp.path, backend="onnxruntime")
    ref_img, ref_txt = _reference(exp, held_out_images, list(HELD_OUT_TEXTS))
    img = session.encode_image(held_out_images)
    txt = session.encode_text(list(HELD_OUT_TEXTS))
    assert img.dtype == np.float32 and img.shape == ref_img.shape
    assert txt.dtype == np.float32 and txt.shape == ref_txt.shape
    cos_img, cos_txt = cosine_rows(img, ref_img).min(), cosine_rows(txt, ref_txt).min()
    print(f"{exp.name}: image min cosine {cos_img:.8f}, text min cosine {cos_txt:.8f}")
    assert cos_img >= 0.99999, f"image min cosine {cos_img:.8f}"
    assert cos_txt >= 0.99999, f"text min cosine {cos_txt:.8f}"
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("fixture", ["vit_b_32_artifact", "rn50_artifact"])
def test_manifest_records_the_contract(fixture, request):
    exp: Exported = request.getfixturevalue(fixture)
    m = read_manifest(exp.path)
    assert m["model"]["name"] == exp.name
    assert m["model"]["checkpoint_sha256"] == file_sha256(exp.checkpoint)
    assert m["model"]["logit_scale"] == pytest.approx(float(exp.model.logit_scale.detach().exp()), rel=1e-6)
    assert m["model"]["logit_bias"] is None
    assert m["towers"]["image"]["inputs"][0]["shape"][0] == "batch"
    # A causal text tower takes a dynamic length: each batch is padded only to its longest text.
    text = m["towers"]["text"]
    assert text["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}
    assert text["padding"] == "longest" and text["pooling"] == "argmax" and text["causal"] is True
    assert text["context_length"] == 77 and text["sequence"] == {"min": 1, "max": 77}
    assert m["preprocess"]["size"] == [224, 224]
    assert m["tokenizer"]["kind"] == "openclip-bpe"
    export = m["validation"]["export"]
    assert export["passed"] and export["batches"] == [1, 8]
    for tower in ("image", "text"):
        assert export[tower]["min_cosine"] >= 0.99999
        assert export[tower]["abs_err_rel"] <= 1e-4
        assert set(export[tower]["batches"]) == {"1", "8"}
    assert export["tokenizer"]["mismatched"] == 0
    assert export["preprocess"]["max_abs_diff"] <= 1e-5
    files = {v["file"]: v for v in m["variants"]}
    assert set(files) == {"image.fp32.onnx", "text.fp32.onnx"}
    for name, v in files.items():
        assert v["sha256"] == file_sha256(exp.path / name)
        assert v["opset"] >= 17 and v["validation"]["passed"]
    for rel, digest in m["files"].items():
        assert file_sha256(exp.path / rel) == digest
    assert {"torch", "open_clip_torch", "onnx", "onnxruntime"} <= set(m["tools"])


def test_onnx_graph_keeps_layernorm_whole_and_ids_integer(vit_b_32_artifact):
    import onnx

    text = onnx.load(str(vit_b_32_artifact.path / "text.fp32.onnx"), load_external_data=False)
    ops = {n.op_type for n in text.graph.node}
    assert "LayerNormalization" in ops
    assert text.opset_import[0].version >= 17
    (inp,) = text.graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert inp.type.tensor_type.shape.dim[1].dim_param == "sequence"
    # The pooling argmax reads the int64 ids directly: no Cast of the ids to a float type.
    casts_of_ids = [n for n in text.graph.node if n.op_type == "Cast" and inp.name in n.input]
    assert not casts_of_ids


def test_custom_architecture_from_json_config(micro_artifact):
    m = read_manifest(micro_artifact.path)
    assert m["model"]["model_config"] == json.loads(MICRO_CONFIG.read_text())
    assert m["preprocess"]["size"] == [64, 64]
    assert m["model"]["embed_dim"] == 64


def test_random_weights_are_seeded_and_recorded(tmp_path):
    out = tmp_path / "a"
    m = export_model(ExportConfig(model="micro-vit", output=out, model_config=MICRO_CONFIG, seed=3))
    assert m["model"]["random_init_seed"] == 3
    assert m["model"]["checkpoint_sha256"] is None


# ---- refusals -------------------------------------------------------------------------------------


def test_unknown_model_suggests_close_names(tmp_path):
    with pytest.raises(UsageError, match=r"unknown model 'ViT-B-33'.*ViT-B-32"):
        export_model(ExportConfig(model="ViT-B-33", output=tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_unknown_pretrained_tag_lists_valid_ones(tmp_path):
    with pytest.raises(UsageError, match=r"unknown pretrained tag 'nope' for ViT-B-32; valid tags: .*openai"):
        export_model(ExportConfig(model="ViT-B-32", output=tmp_path / "x", pretrained="nope"))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist"):
        export_model(ExportConfig(model="RN50", output=tmp_path / "x", checkpoint=tmp_path / "missing.pt"))


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"bad.pt' is not a PyTorch or safetensors file"):
        export_model(ExportConfig(model="micro-vit", output=tmp_path / "x", checkpoint=bad, model_config=MICRO_CONFIG))
    assert not (tmp_path / "x").exists()


def test_checkpoint_of_another_architecture(tmp_path, micro_artifact):
    with pytest.raises(CheckpointError, match=r"does not fit ViT-B-32"):
        export_model(ExportConfig(model="ViT-B-32", output=tmp_path / "x", checkpoint=micro_artifact.checkpoint))


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil()}, evil, pickle_module=pickle)
    with pytest.raises(CheckpointError, match=r"not a weights-only checkpoint: it holds Python objects \([\w.]*print\)"):
        export_model(ExportConfig(model="micro-vit", output=tmp_path / "x", checkpoint=evil, model_config=MICRO_CONFIG))
    assert "code ran" not in capsys.readouterr().out


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"already exists; pass --force"):
        export_model(ExportConfig(model="micro-vit", output=out, model_config=MICRO_CONFIG))
    # --force replaces only an artifact: a directory of someone's files is never deleted.
    with pytest.raises(UsageError, match=r"not one"):
        export_model(ExportConfig(model="micro-vit", output=out, model_config=MICRO_CONFIG, force=True))
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_parity_leaves_no_artifact_and_keeps_the_previous_one(tmp_path, monkeypatch):
    from clipdeploy.export import specs

    out = tmp_path / "art"
    export_model(ExportConfig(model="micro-vit", output=out, model_config=MICRO_CONFIG))
    before = (out / MANIFEST_NAME).read_bytes()
    impossible = specs.Tolerance(min_cosine=1.5, max_abs_rel=1e-4)
    family = specs.get_family("vit")
    strict = tuple(specs.TowerSpec(**{**t.__dict__, "tolerance": impossible}) for t in family.towers)
    monkeypatch.setitem(specs._FAMILIES, "vit", specs.FamilySpec(**{**family.__dict__, "towers": strict}))
    with pytest.raises(AccuracyError, match=r"min cosine .* < 1.5") as info:
        export_model(ExportConfig(model="micro-vit", output=out, model_config=MICRO_CONFIG, force=True, seed=5))
    assert info.value.report["image"]["passed"] is False
    assert (out / MANIFEST_NAME).read_bytes() == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "art"]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def test_force_replaces_an_artifact(tmp_path):
    out = tmp_path / "art"
    export_model(ExportConfig(model="micro-vit", output=out, model_config=MICRO_CONFIG, seed=1))
    m = export_model(ExportConfig(model="micro-vit", output=out, model_config=MICRO_CONFIG, seed=2, force=True))
    assert read_manifest(out)["model"]["random_init_seed"] == 2 == m["model"]["random_init_seed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_old_opset_is_refused(tmp_path):
    with pytest.raises(UsageError, match=r"--opset 16 is too old"):
        export_model(ExportConfig(model="micro-vit", output=tmp_path / "x", model_config=MICRO_CONFIG, opset=16))


def test_model_config_cannot_shadow_a_builtin(tmp_path):
    with pytest.raises(UsageError, match=r"built-in open_clip architecture"):
        export_model(ExportConfig(model="ViT-B-32", output=tmp_path / "x", model_config=MICRO_CONFIG))


def test_bad_model_config(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"embed_dim": 64}')
    with pytest.raises(UsageError, match=r"lacks vision_cfg, text_cfg"):
        export_model(ExportConfig(model="mine", output=tmp_path / "x", model_config=bad))
    bad.write_text("{not json")
    with pytest.raises(UsageError, match=r"not valid JSON"):
        export_model(ExportConfig(model="mine", output=tmp_path / "x", model_config=bad))


def test_pytorch_weights_are_released_before_onnx_runtime_loads_the_towers(tmp_path, monkeypatch):
    """Peak memory is the larger of the PyTorch model and one tower's session, not their sum: the
    image weights are gone while the text tower is traced, and all weights before the ORT checks."""
    import clipdeploy.export.exporter as exporter

    seen: dict[str, object] = {}
    traced = []
    trace = exporter.export_tower

    def recording_export(spec, model, geometry, path, *, opset):
        traced.append(model)
        seen[f"{spec.tower} traced with image weights"] = not next(model.visual.parameters()).is_meta
        seen[f"{spec.tower} traced with text weights"] = not model.token_embedding.weight.is_meta
        return trace(spec, model, geometry, path, opset=opset)

    check = exporter._check_towers

    def recording_check(*args):
        seen["checked with weights"] = any(not p.is_meta for model in traced for p in model.parameters())
        return check(*args)

    monkeypatch.setattr(exporter, "export_tower", recording_export)
    monkeypatch.setattr(exporter, "_check_towers", recording_check)
    m = export_model(ExportConfig(model="micro-vit", output=tmp_path / "a", model_config=MICRO_CONFIG))
    assert m["validation"]["export"]["passed"]
    assert seen == {
        "image traced with image weights": True,
        "image traced with text weights": True,
        "text traced with image weights": False,
        "text traced with text weights": True,
        "checked with weights": False,
    }
