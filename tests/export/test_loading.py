"""Building models offline: bundled HF text-tower configs, reduced depth for the giants, tokenizers."""

from __future__ import annotations

import pytest

from clipdeploy.errors import UsageError

pytest.importorskip("open_clip")
pytest.importorskip("torch")

from clipdeploy.export.loading import load_model  # noqa: E402


def test_reduced_depth_giant_builds_small():
    loaded = load_model("ViT-e-14", depth=1)
    assert len(loaded.model.visual.transformer.resblocks) == 1
    assert len(loaded.model.transformer.resblocks) == 1
    assert loaded.model.visual.transformer.width == 1792  # the same architecture, only shallower


def test_reduced_depth_timm_giant():
    loaded = load_model("EVA02-E-14", depth=1)
    assert len(loaded.model.visual.trunk.blocks) == 1


def test_reduced_depth_refuses_weights(tmp_path):
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"x")
    with pytest.raises(UsageError, match="reduced depth applies to random weights only"):
        load_model("ViT-e-14", depth=1, checkpoint=ckpt)


def test_hf_text_tower_builds_offline_from_the_bundled_config(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("xlm-roberta-base-ViT-B-32", depth=None)
    text = loaded.model.text
    assert type(text).__name__ == "HFTextEncoder"
    assert text.config.vocab_size == 250002 and text.config.hidden_size == 768
    assert loaded.source["hf_text_config"] == "bundled"
    assert loaded.tokenizer is None and loaded.tokenizer_missing["hf_tokenizer_name"] == "xlm-roberta-base"
    assert loaded.model.clipdeploy_context_length == 77
