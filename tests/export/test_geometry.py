"""What the towers take is read once, when the model is loaded; the specs and the tracer take those facts."""

from __future__ import annotations

import pytest

from clipdeploy.export.geometry import TowerGeometry
from clipdeploy.export.specs import BATCH, CAUSAL_TEXT_TOWER, IMAGE_TOWER, MIN_SEQUENCE, SEQUENCE, TEXT_TOWER
from clipdeploy.export.text_towers import PADDING_LONGEST, PADDING_MAX_LENGTH, TextLayout

CAUSAL = TextLayout(kind="builtin", pooling="argmax", eos_id=None, pad_id=None, causal=True)
BIDIRECTIONAL = TextLayout(kind="text-transformer", pooling="last", eos_id=None, pad_id=None, causal=False)


def _geometry(text: TextLayout = CAUSAL) -> TowerGeometry:
    return TowerGeometry(image_size=(48, 80), context_length=32, text=text, vocab_size=500)


def test_the_image_boundary_is_the_geometry_image_size():
    spec = IMAGE_TOWER.input_spec(_geometry())
    assert spec.shape == (BATCH, 3, 48, 80)
    assert IMAGE_TOWER.manifest_entry(_geometry(), 64) == {
        "inputs": [{"name": "pixel_values", "dtype": "float32", "shape": [BATCH, 3, 48, 80]}],
        "outputs": [{"name": "image_embeds", "dtype": "float32", "shape": [BATCH, 64]}],
        "embed_dim": 64,
    }


def test_a_causal_tower_with_id_pooling_gets_a_dynamic_sequence_up_to_the_context_length():
    g = _geometry(CAUSAL)
    assert CAUSAL_TEXT_TOWER.dynamic_sequence(g)
    assert CAUSAL_TEXT_TOWER.input_spec(g).shape == (BATCH, SEQUENCE)
    entry = CAUSAL_TEXT_TOWER.manifest_entry(g, 64)
    assert entry["padding"] == PADDING_LONGEST
    assert entry["context_length"] == 32
    assert entry["sequence"] == {"min": MIN_SEQUENCE, "max": 32}
    assert (entry["pooling"], entry["eos_token_id"], entry["causal"]) == ("argmax", None, True)


@pytest.mark.parametrize(
    ("spec", "text"), [(CAUSAL_TEXT_TOWER, BIDIRECTIONAL), (TEXT_TOWER, CAUSAL)], ids=["bidirectional", "max_length"]
)
def test_otherwise_the_text_is_padded_to_the_context_length(spec, text):
    g = _geometry(text)
    assert not spec.dynamic_sequence(g)
    assert spec.input_spec(g).shape == (BATCH, 32)
    entry = spec.manifest_entry(g, 64)
    assert entry["padding"] == PADDING_MAX_LENGTH
    assert entry["sequence"] == {"min": 32, "max": 32}


def test_the_trace_example_and_axes_follow_the_boundary():
    pytest.importorskip("torch")
    from clipdeploy.export.onnx_export import EXAMPLE_SEQUENCE, MAX_EXPORT_BATCH, dynamic_axes, example_input

    boundary = CAUSAL_TEXT_TOWER.input_spec(_geometry())
    ids = example_input(boundary, vocab_size=500)
    assert tuple(ids.shape) == (2, EXAMPLE_SEQUENCE) and int(ids.max()) < 500
    axes = dynamic_axes(boundary, context_length=32)
    assert (axes[0].min, axes[0].max) == (1, MAX_EXPORT_BATCH)
    assert (axes[1].min, axes[1].max) == (MIN_SEQUENCE, 32)
    pixels = example_input(IMAGE_TOWER.input_spec(_geometry()), vocab_size=None)
    assert tuple(pixels.shape) == (2, 3, 48, 80)


def test_load_model_reads_the_geometry_and_stamps_nothing_on_the_module():
    pytest.importorskip("open_clip")
    pytest.importorskip("torch")
    from clipdeploy.export.loading import load_model
    from tests.support.testdata import MICRO_CONFIG

    loaded = load_model("micro-vit", model_config=MICRO_CONFIG, seed=0)
    g = loaded.geometry
    assert g.image_size == (64, 64)
    assert g.context_length == 77
    assert g.vocab_size == 49408
    assert (g.text.kind, g.text.pooling, g.text.causal, g.text.dynamic) == ("builtin", "argmax", True, True)
    assert not [a for a in vars(loaded.model) if a.startswith("clipdeploy")]
