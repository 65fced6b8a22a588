"""`clipdeploy inspect`: a file the manifest lists but the directory lacks is reported, and the exit code is 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from clipdeploy.cli import main


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    pytest.importorskip("onnx", reason="the tiny artifact is written with onnx")
    from tests.support.tiny_artifact import bpe_vocab, make_tiny_artifact

    if bpe_vocab() is None:
        pytest.skip("open_clip's BPE vocabulary (the tiny artifact's tokenizer) is not installed")
    return make_tiny_artifact(tmp_path / "art", precisions=("fp32", "fp16"))


def test_inspect_passes_a_whole_artifact(tiny, capsys):
    assert main(["inspect", str(tiny)]) == 0
    out, err = capsys.readouterr()
    assert "MISSING" not in out and err == ""


@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_reports_missing_files_and_exits_1(tiny, as_json, capsys):
    (tiny / "text.fp32.onnx").unlink()
    shutil.rmtree(tiny / "tokenizer")
    code = main(["inspect", str(tiny), *(["--json"] if as_json else [])])
    out, err = capsys.readouterr()
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipdeploy: error: 2 file(s) the manifest lists are missing"), err
    assert "text.fp32.onnx" in lines[0] and "tokenizer/bpe_simple_vocab_16e6.txt.gz" in lines[0], err
    if as_json:
        json.loads(out)  # the manifest is still printed whole
    else:
        row = next(line for line in out.splitlines() if line.rstrip().endswith("text.fp32.onnx  MISSING"))
        assert row.split()[:2] == ["text", "fp32"], row
        assert not any(line.rstrip().endswith("image.fp32.onnx  MISSING") for line in out.splitlines())


def test_inspect_summarizes_the_view(tiny, capsys):
    """Every line of the summary comes from ArtifactView: weights, provenance, preprocessing, the one context length."""
    from clipdeploy.artifact.manifest import read_manifest, write_manifest

    m = read_manifest(tiny)
    m["model"].update(checkpoint="w.pt", checkpoint_sha256="ab" * 32, logit_bias=-10.0)
    m["created"], m["tools"] = "2025-01-01T00:00:00+00:00", {"clipdeploy": "0.1", "onnx": "1.17"}
    m["towers"]["text"].update(padding="longest", context_length=64)
    m["tokenizer"]["context_length"] = 64
    m["variants"][0].update(bytes=123456, validation={"passed": True, "min_cosine": 0.9999999, "max_abs_err": 1e-6})
    m["validation"] = {"export": {"reference": "torch", "images": ["a.jpg", "b.jpg"], "prompts": 5, "batches": [1, 8]}}
    write_manifest(tiny, m)
    assert main(["inspect", str(tiny)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "tiny  [test]  checkpoint w.pt (sha256 abababababababab…)"
    assert lines[1] == "  schema 1.0, made 2025-01-01T00:00:00+00:00 by clipdeploy 0.1"
    assert lines[2] == "  embed dim 16, logit scale 100, logit bias -10"
    assert lines[3].startswith("  preprocess 32x32 bicubic resize=shortest mean=(0.4815")
    assert lines[4] == "  tokenizer openclip-bpe, context length 64"
    assert "  text  input_ids int64 [batch, sequence] -> text_embeds float32 [batch, 16]" in lines
    assert any(line.split()[:7] == ["image", "fp32", "onnx", "0.1", "MB", "0.9999999", "1.00e-06"] for line in lines)
    assert lines[-2].startswith("export check: vs torch on 2 images / 5 prompts at batch 1, 8;")
    assert lines[-1] == "tools: clipdeploy 0.1, onnx 1.17"
