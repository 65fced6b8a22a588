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
