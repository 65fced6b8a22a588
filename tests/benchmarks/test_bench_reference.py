"""The PyTorch reference: same weights as the artifact, checkpoint checks, and exact short-length text."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from clipdeploy.benchmarks.inputs import make_inputs, used_length
from clipdeploy.benchmarks.torch_reference import (
    build_reference_model,
    check_reference_weights,
    prefix_text_encoder,
)
from clipdeploy.errors import CheckpointError, UsageError
from clipdeploy.artifact.view import ArtifactView, ModelFacts

from tests.support.testdata import MICRO_CONFIG


def test_checkpoint_checks(micro_artifact, tmp_path):
    manifest = ArtifactView.read(micro_artifact.path).model
    with pytest.raises(CheckpointError, match="--checkpoint FILE"):
        check_reference_weights(manifest, None)
    other = tmp_path / "other.pt"
    other.write_bytes(b"not the checkpoint")
    with pytest.raises(CheckpointError, match="has sha256"):
        check_reference_weights(manifest, other)
    with pytest.raises(CheckpointError, match="does not exist"):
        check_reference_weights(manifest, tmp_path / "missing.pt")
    check_reference_weights(manifest, micro_artifact.checkpoint)
    random_manifest = ModelFacts.from_dict({"name": "x", "random_init_seed": 0})
    with pytest.raises(UsageError, match="drop --checkpoint"):
        check_reference_weights(random_manifest, micro_artifact.checkpoint)


def test_checkpoint_reference_has_the_artifacts_weights(micro_artifact):
    torch = pytest.importorskip("torch")
    model = build_reference_model(ArtifactView.read(micro_artifact.path).model, micro_artifact.checkpoint)
    for (name, a), b in zip(model.state_dict().items(), micro_artifact.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_random_init_reference_reproduces_the_export_recipe():
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    cfg = json.loads(MICRO_CONFIG.read_text())
    facts = ModelFacts.from_dict({"name": "micro-vit", "model_config": cfg, "random_init_seed": 11, "pretrained": None})
    model = build_reference_model(facts)
    torch.manual_seed(11)
    expected = open_clip.create_model("micro-vit", pretrained=None, device="cpu", precision="fp32")
    for (name, a), b in zip(model.state_dict().items(), expected.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_short_text_is_exact_on_a_causal_tower(micro_artifact):
    torch = pytest.importorskip("torch")
    model = micro_artifact.model
    inputs = make_inputs(ArtifactView.read(micro_artifact.path), 8)
    encode, reason = prefix_text_encoder(model)
    assert encode is not None, reason
    ids = torch.from_numpy(inputs.tokens)
    short = inputs.prompt_length
    assert short == used_length(inputs.tokens) < 77
    with torch.inference_mode():
        full = model.encode_text(ids).numpy()
        same = encode(ids).numpy()
        cut = encode(ids[:, :short]).numpy()
    np.testing.assert_allclose(same, full, atol=1e-6)
    np.testing.assert_allclose(cut, full, atol=2e-5, rtol=1e-4)


def test_short_text_refuses_a_non_causal_tower(micro_artifact):
    model = copy.deepcopy(micro_artifact.model)
    model.attn_mask = None
    encode, reason = prefix_text_encoder(model)
    assert encode is None and "causal" in reason
