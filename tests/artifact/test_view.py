"""The typed manifest view: one definition of each fact, read-only."""

from __future__ import annotations

import copy

import pytest

from clipdeploy.artifact.view import ArtifactView
from clipdeploy.errors import ArtifactError

BASE = {
    "schema_version": "1.0",
    "model": {"name": "m", "pretrained": None, "family": "vit", "embed_dim": 4, "logit_scale": 100.0, "logit_bias": None},
    "towers": {
        "image": {"inputs": [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 32, 48]}],
                  "outputs": [{"name": "image_embeds", "dtype": "float32", "shape": ["batch", 4]}], "embed_dim": 4},
        "text": {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
                 "outputs": [{"name": "text_embeds", "dtype": "float32", "shape": ["batch", 4]}], "embed_dim": 4,
                 "padding": "longest", "pooling": "argmax", "context_length": 64},
    },
    "preprocess": {"size": [32, 48]},
    "tokenizer": {"kind": "openclip-bpe", "context_length": 77},
    "variants": [{"tower": "image", "precision": "fp32", "format": "onnx", "file": "image.fp32.onnx", "sha256": "0" * 64,
                  "validation": {"passed": True}},
                 {"tower": "image", "precision": "int8", "format": "onnx", "file": "image.int8.onnx", "sha256": "1" * 64,
                  "validation": {"passed": False}}],
}  # fmt: skip


def test_context_length_has_one_definition_with_its_fallbacks_in_order(tmp_path):
    m = copy.deepcopy(BASE)
    assert ArtifactView.of(tmp_path, m).context_length == 64  # the text tower's own record first
    del m["towers"]["text"]["context_length"]
    assert ArtifactView.of(tmp_path, m).context_length == 77  # then the tokenizer's
    del m["tokenizer"]["context_length"]
    assert ArtifactView.of(tmp_path, m).context_length is None  # a dynamic input has no width to read
    m["towers"]["text"]["inputs"][0]["shape"] = ["batch", 32]
    assert ArtifactView.of(tmp_path, m).context_length == 32  # then the input's fixed width
    del m["towers"]["text"]
    assert ArtifactView.of(tmp_path, m).context_length is None


def test_facts_variants_and_read_only(tmp_path):
    view = ArtifactView.of(tmp_path, BASE)
    assert view.image_size == (32, 48) and view.text_is_dynamic
    assert view.tower("text").input.name == "input_ids" and view.tower("image").output.shape == ("batch", 4)
    assert view.model.logit_scale == 100.0 and view.model.logit_bias is None
    assert view.variant("image", "int8").file == "image.int8.onnx" and view.variant("text", "fp32") is None
    assert [v.precision for v in view.variants_of("image", accepted=True)] == ["fp32"]
    with pytest.raises(TypeError):
        view.raw["model"] = {}  # type: ignore[index]
    with pytest.raises(ArtifactError, match="no audio tower"):
        view.tower("audio")


def test_provenance_and_weights_source(tmp_path):
    m = copy.deepcopy(BASE)
    view = ArtifactView.of(tmp_path, m)
    assert view.schema_version == "1.0" and view.created is None and dict(view.tools) == {}
    assert view.model.checkpoint is None and view.model.random_init_seed is None
    m["created"], m["tools"] = "2025-01-01T00:00:00+00:00", {"clipdeploy": "0.1"}
    m["model"].update(checkpoint="w.pt", random_init_seed=3)
    view = ArtifactView.of(tmp_path, m)
    assert view.created.startswith("2025") and view.tools["clipdeploy"] == "0.1"
    assert (view.model.checkpoint, view.model.random_init_seed) == ("w.pt", 3)


def test_tokenizer_missing_says_why_or_is_none(tmp_path):
    m = copy.deepcopy(BASE)
    assert ArtifactView.of(tmp_path, m).tokenizer_missing is None
    m["tokenizer"]["missing"] = {"reason": "offline"}
    assert ArtifactView.of(tmp_path, m).tokenizer_missing == {"reason": "offline"}


def test_model_config_is_read_only_or_none(tmp_path):
    m = copy.deepcopy(BASE)
    assert ArtifactView.of(tmp_path, m).model.model_config is None
    m["model"]["model_config"] = {"embed_dim": 4}
    config = ArtifactView.of(tmp_path, m).model.model_config
    assert dict(config) == {"embed_dim": 4}
    with pytest.raises(TypeError):
        config["embed_dim"] = 8  # type: ignore[index]


def test_with_towers_keeps_only_those_towers(tmp_path):
    view = ArtifactView.of(tmp_path, BASE)
    image_only = view.with_towers(["image"])
    assert list(image_only.towers) == ["image"] and list(view.towers) == ["image", "text"]
    assert image_only.variants == view.variants and image_only.root == view.root
