"""One small representative per family, exported through its spec and the parity gate (CI).

The ViT and ModifiedResNet families are covered at full size by the ViT-B-32 and RN50 fixtures.
Every other family gets a micro model here, built from the family's own tower types (the same timm
architectures at their smallest, or the real architecture at reduced depth), so CI stays short.
The full-size representatives (``FamilySpec.representative``) run in the slow test at the bottom,
and the whole of open_clip in ``python tools/coverage.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("open_clip")
pytest.importorskip("torch")
pytest.importorskip("timm")

from clipdeploy.export import specs  # noqa: E402
from clipdeploy.export.config import ExportConfig  # noqa: E402
from clipdeploy.export.exporter import export_model  # noqa: E402

_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
_VIT = {"image_size": 64, "layers": 1, "width": 64, "head_width": 32, "patch_size": 32}


def _timm(arch: str, image_size: int, pool: str = "avg", proj: Any = "linear") -> dict[str, Any]:
    return {"timm_model_name": arch, "timm_model_pretrained": False, "timm_pool": pool, "timm_proj": proj,
            "image_size": image_size}


@dataclass(frozen=True)
class Case:
    """A micro model of one family: an open_clip config (or a real architecture at reduced depth)."""

    family: str  # the family the exporter must detect
    config: dict[str, Any] | None = None  # a micro open_clip model config; None: use `model` at `depth`
    model: str | None = None  # a real architecture, exported at reduced depth
    depth: int | None = None
    padding: str = "longest"  # the text padding the manifest must record
    extra: dict[str, Any] = field(default_factory=dict)  # manifest facts to check


CASES = {
    "coca": Case("coca", {
        "embed_dim": 64, "custom_text": True,
        "vision_cfg": {**_VIT, "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 8,
                       "output_tokens": True},
        "text_cfg": {**_TEXT, "context_length": 76, "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1,
                           "attn_pooler_heads": 2},
    }, padding="max_length"),
    "hf-text": Case("hf-text", None, padding="max_length", extra={"pooling": "mean"}),  # config built in the test
    "mobileclip": Case("mobileclip", {
        "embed_dim": 64, "custom_text": True, "vision_cfg": _timm("fastvit_mci0", 64, proj=None),
        "text_cfg": {**_TEXT, "no_causal_mask": True},
    }, padding="max_length", extra={"prepared": "reparameterize"}),
    "siglip": Case("siglip", model="ViT-B-16-SigLIP", depth=1, padding="max_length", extra={"pooling": "last"}),
    "pe-core": Case("pe-core", model="PE-Core-T-16-384", depth=1),
    "eva": Case("eva", model="EVA02-B-16", depth=1),
    "convnext": Case("convnext", model="convnext_tiny", depth=1),
    "vitamin": Case("vitamin", model="ViTamin-S", depth=1),
    "swin": Case("swin", model="swin_base_patch4_window7_224", depth=1),
    "timm-vit": Case("timm-vit", model="vit_relpos_medium_patch16_cls_224", depth=1),
}


def _hf_text_config(tmp: Path) -> dict[str, Any]:
    """A micro roberta text tower and tokenizer, both in local folders (what the hub would serve)."""
    from tests.support import hf_tokenizers

    model_dir = tmp / "tiny-roberta"
    model_dir.mkdir()
    cfg = {"model_type": "roberta", "vocab_size": 600, "hidden_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2, "intermediate_size": 128, "max_position_embeddings": 80, "pad_token_id": 1,
           "bos_token_id": 0, "eos_token_id": 2, "type_vocab_size": 1}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    tok_dir = hf_tokenizers.hf_folder(hf_tokenizers.by_name("roberta"), tmp)
    return {
        "embed_dim": 64, "vision_cfg": _VIT,
        "text_cfg": {"hf_model_name": str(model_dir), "hf_tokenizer_name": str(tok_dir),
                     "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear"},
    }


# Ops through which a tensor still carries the token ids themselves (not positions, masks or embeddings).
_ID_PRESERVING = {"Cast", "Reshape", "Slice", "Unsqueeze", "Squeeze", "Concat", "Identity", "Expand", "Transpose",
                  "Flatten", "Add", "Sub", "Mul", "Where", "Pad", "Tile", "Split"}
_FLOATS = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


def ids_reach_a_float_cast(path: Path) -> list[str]:
    """Casts of the token ids (or a reshaping of them) to a float type: in fp16, 49406 == 49407."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    bad, seen, todo = [], set(), [graph.input[0].name]
    while todo:
        name = todo.pop()
        for node, slot in consumers.get(name, []):
            if node.op_type == "Cast":
                to = next(a.i for a in node.attribute if a.name == "to")
                if to in _FLOATS:
                    bad.append(node.name)
                    continue
            if node.op_type == "Gather" and slot == 0 or node.op_type in _ID_PRESERVING:
                for out in node.output:
                    if out not in seen:
                        seen.add(out)
                        todo.append(out)
    return bad


def test_every_family_has_a_ci_case():
    named = {f.name for f in specs.list_families() if f.tested}
    assert named - {"vit", "modified-resnet"} == set(CASES), "add a micro case for each new family"
    for f in specs.list_families():
        assert f.representative or f.name == "open_clip", f.name


@pytest.mark.parametrize("name", sorted(CASES))
def test_family_exports_within_tolerance(name, tmp_path):
    import clipdeploy

    case = CASES[name]
    if case.config is not None or name == "hf-text":
        config = case.config if case.config is not None else _hf_text_config(tmp_path)
        path = tmp_path / f"micro-{name}.json"
        path.write_text(json.dumps(config))
        cfg = ExportConfig(model=f"micro-{name}", output=tmp_path / "art", model_config=path, seed=1)
    else:
        cfg = ExportConfig(model=case.model, output=tmp_path / "art", seed=1, depth=case.depth)
    m = export_model(cfg)
    export = m["validation"]["export"]
    print(f"{name}: image min cos {export['image']['min_cosine']:.8f}, text min cos {export['text']['min_cosine']:.8f}, "
          f"{m['export_seconds']}s")
    assert m["model"]["family"] == case.family
    assert export["passed"] and export["image"]["passed"] and export["text"]["passed"]
    text = m["towers"]["text"]
    assert text["padding"] == case.padding
    assert text["inputs"][0]["shape"][1] == ("sequence" if case.padding == "longest" else text["context_length"])
    if case.padding == "longest":
        assert export["text"]["lengths"]["each_text_at_its_own_length"]["min_cosine"] >= 0.99999
    assert not ids_reach_a_float_cast(tmp_path / "art" / "text.fp32.onnx"), "token ids pass through a float type"
    for key, want in case.extra.items():
        got = text.get(key, m["model"].get(key))
        assert got == want, f"{key}: {got!r} != {want!r}"
    if case.family == "mobileclip":
        # Checked against the original (unfused) model as well as the reparameterized one.
        assert export["image"]["original"]["min_cosine"] >= 0.99999
    if not m["tokenizer"].get("missing"):
        session = clipdeploy.load(tmp_path / "art")
        assert session.encode_text(["a photo of a cat", ""]).shape == (2, m["model"]["embed_dim"])


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in specs.list_families() if f.representative], ids=lambda f: f.name)
def test_family_representative_at_full_size(family, tmp_path):
    """The real representative of each family, full size, through the coverage worker."""
    from tools.coverage import run_one  # the repository's coverage sweep (tests/conftest.py puts it on the path)

    row = run_one(family.representative, reduced_depth=False, workdir=tmp_path)
    assert row["status"] == "passed", row.get("error")
    assert row["family"] == family.name
    assert all(t["min_cosine"] >= 0.99999 for t in row["towers"].values()), row["towers"]
