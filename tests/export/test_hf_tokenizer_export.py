"""Models whose tokenizer open_clip fetches from the Hugging Face hub, exported without the hub.

A micro SigLIP-style model (bidirectional text tower, last-token pooling, logit bias, a T5-style
tokenizer with clean=canonicalize, pad and eos sharing an id) is exported twice: with
``--tokenizer-dir`` holding a locally built tokenizer, and without it while the hub is unreachable.
"""

from __future__ import annotations

import numpy as np
import pytest

from clipdeploy.errors import ArtifactError, UsageError
from clipdeploy.artifact.manifest import read_manifest
from clipdeploy.validation import cosine_rows

from tests.support.testdata import HELD_OUT_TEXTS, TESTS

pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers", reason="open_clip's HFTokenizer needs transformers")

from tests.support import hf_tokenizers  # noqa: E402
from clipdeploy.export.config import ExportConfig  # noqa: E402
from clipdeploy.export.exporter import export_model  # noqa: E402

CONFIG = TESTS / "data" / "micro-siglip.json"
NAME = "micro-siglip"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    hf_tokenizers.EXTRA_TRAIN[:] = list(HELD_OUT_TEXTS)
    return hf_tokenizers.hf_folder(hf_tokenizers.by_name("siglip-t5"), tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model_and_checkpoint(tmp_path_factory):
    import open_clip

    from clipdeploy.export.loading import register_model_config

    register_model_config(NAME, CONFIG)
    torch.manual_seed(11)
    model = open_clip.create_model(NAME).eval()
    ckpt = tmp_path_factory.mktemp("ckpt") / "micro-siglip.pt"
    torch.save(model.state_dict(), ckpt)
    return model, ckpt


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory, tokenizer_dir, model_and_checkpoint):
    _, ckpt = model_and_checkpoint
    out = tmp_path_factory.mktemp("art") / "with"
    export_model(ExportConfig(model=NAME, output=out, checkpoint=ckpt, model_config=CONFIG, tokenizer_dir=tokenizer_dir))
    return out


@pytest.fixture(scope="module")
def without_tokenizer(tmp_path_factory, model_and_checkpoint, monkeypatch_module):
    _, ckpt = model_and_checkpoint
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path_factory.mktemp("art") / "without"
    export_model(ExportConfig(model=NAME, output=out, checkpoint=ckpt, model_config=CONFIG))
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_tokenizer_in_artifact_matches_open_clip(with_tokenizer, tokenizer_dir, model_and_checkpoint):
    import clipdeploy
    from open_clip.tokenizer import HFTokenizer

    model, _ = model_and_checkpoint
    m = read_manifest(with_tokenizer)
    tok = m["tokenizer"]
    assert tok["kind"] == "hf-tokenizers" and tok["clean"] == "canonicalize"
    assert tok["hf_tokenizer_name"] == "timm/ViT-B-16-SigLIP" and tok["pad_token_id"] == 1
    assert m["validation"]["export"]["tokenizer"]["mismatched"] == 0
    text = m["towers"]["text"]
    # Bidirectional with last-token pooling: padded as trained, no dynamic axis.
    assert text["padding"] == "max_length" and text["pooling"] == "last" and text["causal"] is False
    assert text["inputs"][0]["shape"] == ["batch", 16]
    assert m["model"]["logit_bias"] == pytest.approx(-10.0)
    session = clipdeploy.load(with_tokenizer)
    ref_tok = HFTokenizer(str(tokenizer_dir), context_length=16, clean="canonicalize")
    texts = list(HELD_OUT_TEXTS)
    np.testing.assert_array_equal(session.tokenize(texts), ref_tok(texts).numpy())
    with torch.inference_mode():
        ref = model.encode_text(ref_tok(texts), normalize=True).numpy()
    cos = cosine_rows(session.encode_text(texts), ref).min()
    assert cos >= 0.99999, cos
    with pytest.raises(UsageError, match="padding='longest' needs a dynamic-length text tower"):
        session.tokenize(texts, padding="longest")


def test_missing_tokenizer_still_exports_both_towers(without_tokenizer, model_and_checkpoint):
    import clipdeploy

    model, _ = model_and_checkpoint
    m = read_manifest(without_tokenizer)
    tok = m["tokenizer"]
    assert tok["kind"] == "hf-tokenizers" and tok["missing"]["hf_tokenizer_name"] == "timm/ViT-B-16-SigLIP"
    assert "--tokenizer-dir" in tok["missing"]["fix"]
    export = m["validation"]["export"]
    assert export["image"]["passed"] and export["text"]["passed"] and export["passed"]
    assert export["tokenizer"]["missing"] is True
    assert {v["tower"] for v in m["variants"]} == {"image", "text"}

    session = clipdeploy.load(without_tokenizer)
    ids = np.zeros((2, 16), np.int64)
    ids[0, :4] = [5, 9, 30, 1]
    ids[1, :3] = [7, 8, 1]
    ids[:, 4:] = 1
    with torch.inference_mode():
        ref = model.encode_text(torch.from_numpy(ids), normalize=True).numpy()
    assert cosine_rows(session.encode_tokens(ids), ref).min() >= 0.99999
    with pytest.raises(ArtifactError, match=r"no tokenizer.*timm/ViT-B-16-SigLIP.*--tokenizer-dir") as info:
        session.encode_text(["a cat"])
    assert "\n" not in str(info.value)


def test_tokenizer_dir_for_a_bpe_model_is_refused(tmp_path, tokenizer_dir):
    with pytest.raises(UsageError, match="built-in BPE tokenizer; drop --tokenizer-dir"):
        export_model(
            ExportConfig(model="micro-vit", output=tmp_path / "x", model_config=TESTS / "data" / "micro-vit.json",
                         tokenizer_dir=tokenizer_dir)
        )
    assert not (tmp_path / "x").exists()
