"""Dynamic text length on causal towers: exact against full-length padding and against open_clip.

The ViT and ModifiedResNet families export the text tower with a "sequence" axis. The runtime pads
each batch only to its longest text; these tests prove that gives the embeddings of full-length
padding (cosine >= 0.99999) and of open_clip itself, and that encode_tokens takes either form.
"""

from __future__ import annotations

import numpy as np
import pytest

from clipdeploy.errors import InputError
from clipdeploy.artifact.manifest import read_manifest
from clipdeploy.validation import cosine_rows

from tests.support.testdata import HELD_OUT_TEXTS, Exported

pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")

CAUSAL = ["vit_b_32_artifact", "rn50_artifact"]
# Lengths from SOT+EOT alone up to one that fills the whole 77-token context.
TEXTS = list(HELD_OUT_TEXTS) + ["a photo of " + "a very large and very fluffy orange cat, " * 20, "a", "x y z"]


def _session(exp: Exported):
    import clipdeploy

    return clipdeploy.load(exp.path, backend="onnxruntime")


@pytest.mark.parametrize("fixture", CAUSAL)
def test_trimmed_equals_full_length_padding(fixture, request):
    exp: Exported = request.getfixturevalue(fixture)
    session = _session(exp)
    full = session.tokenize(TEXTS)
    assert full.shape == (len(TEXTS), 77)
    runner = session.runners["text"]
    # The graph itself on full-length ids (no trimming), against the runtime's trimmed path.
    padded = runner.infer({"input_ids": full})["text_embeds"]
    trimmed = session.encode_tokens(full, normalize=False)
    each = np.concatenate([session.encode_text([t], normalize=False) for t in TEXTS])
    cos_batch = cosine_rows(trimmed, padded).min()
    cos_each = cosine_rows(each, padded).min()
    print(f"{exp.name}: trimmed batch vs full-length padding min cosine 1-{1 - cos_batch:.1e}, "
          f"each text at its own length 1-{1 - cos_each:.1e}, max abs diff {np.abs(trimmed - padded).max():.1e}")
    assert cos_batch >= 0.99999 and cos_each >= 0.99999, (cos_batch, cos_each)


@pytest.mark.parametrize("fixture", CAUSAL)
def test_dynamic_length_matches_open_clip(fixture, request):
    exp: Exported = request.getfixturevalue(fixture)
    session = _session(exp)
    with torch.inference_mode():
        ref = exp.model.encode_text(exp.tokenizer(TEXTS)).numpy()
    for rows in ([0], [1, 2], list(range(len(TEXTS)))):
        got = session.encode_text([TEXTS[i] for i in rows], normalize=False)
        cos = cosine_rows(got, ref[rows]).min()
        print(f"{exp.name}: {len(rows)} texts at length {session.tokenize([TEXTS[i] for i in rows], padding='longest').shape[1]}: "
              f"min cosine vs open_clip 1-{1 - cos:.1e}")
        assert cos >= 0.99999, cos


@pytest.mark.parametrize("fixture", CAUSAL)
def test_export_gate_checked_several_lengths(fixture, request):
    exp: Exported = request.getfixturevalue(fixture)
    lengths = read_manifest(exp.path)["validation"]["export"]["text"]["lengths"]
    own = lengths["own_lengths"]
    assert own[0] == 2 and own[-1] == 77 and len(own) >= 5, own
    assert lengths["each_text_at_its_own_length"]["min_cosine"] >= 0.99999
    assert any(k.startswith("batch 8 at length") for k in lengths)


def test_tokenize_padding_options(vit_b_32_artifact):
    session = _session(vit_b_32_artifact)
    texts = ["a cat", "a photo of a dog in the park"]
    full = session.tokenize(texts)
    np.testing.assert_array_equal(full, vit_b_32_artifact.tokenizer(texts).numpy())  # open_clip's ids by default
    short = session.tokenize(texts, padding="longest")
    longest = int((full != 0).sum(axis=1).max())
    assert short.shape == (2, longest) and short[1, -1] == 49407
    np.testing.assert_array_equal(short, full[:, :longest])
    with pytest.raises(Exception, match="padding='nope'"):
        session.tokenize(texts, padding="nope")


def test_encode_tokens_accepts_any_padding(vit_b_32_artifact):
    session = _session(vit_b_32_artifact)
    full = session.tokenize(["a cat", "a dog on a sofa"])
    a = session.encode_tokens(full)
    b = session.encode_tokens(full[:, :10])  # trimmed further, still past every EOT
    c = session.encode_tokens(np.pad(full[:, :7], ((0, 0), (0, 3))))  # own padding, not full length
    assert cosine_rows(a, b).min() >= 0.99999 and cosine_rows(a, c).min() >= 0.99999
    too_long = np.pad(full, ((0, 0), (0, 5)))
    too_long[0, 80] = 49408 - 1  # an EOT past the context: the tower has no position for it
    too_long[0, :80][too_long[0, :80] == 49407] = 0
    with pytest.raises(InputError, match="past the context length 77"):
        session.encode_tokens(too_long)


def test_onnx_text_input_has_both_named_axes(rn50_artifact):
    import onnx

    text = onnx.load(str(rn50_artifact.path / "text.fp32.onnx"), load_external_data=False)
    (inp,) = text.graph.input
    assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
