"""`clipdeploy triton` never writes an empty repository and exits 0: an artifact with nothing to serve
under the chosen --format/--precision, or a --precision that nothing matches, exits 2 and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.support.triton_helpers import add_engine, add_onnx_copy, copy_artifact

from clipdeploy.cli import main


@pytest.fixture
def art(micro_artifact, tmp_path) -> Path:
    return copy_artifact(micro_artifact.path, tmp_path / "micro")


def _refused(capsys, argv: list[str], out: Path) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipdeploy: error:") and "\n" not in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*")), "something was written"
    return err


def test_tensorrt_without_engines_says_build_first(art, tmp_path, capsys):
    out = tmp_path / "repo"
    err = _refused(capsys, ["triton", str(art), "-o", str(out), "--format", "tensorrt"], out)
    assert "nothing to serve with --format tensorrt" in err and f"clipdeploy build {art}" in err
    assert "fp32 onnx" in err  # what the artifact does have


def test_precision_that_does_not_exist(art, tmp_path, capsys):
    out = tmp_path / "repo"
    err = _refused(capsys, ["triton", str(art), "-o", str(out), "--precision", "fp16"], out)
    assert "--precision fp16" in err and "clipdeploy quantize" in err


def test_one_of_several_precisions_missing(art, tmp_path, capsys):
    out = tmp_path / "repo"
    err = _refused(capsys, ["triton", str(art), "-o", str(out), "--precision", "fp32", "--precision", "int8"], out)
    assert "--precision int8 matches no accepted variant" in err


def test_variant_that_failed_its_gate(art, tmp_path, capsys):
    add_onnx_copy(art, "image", "int8")
    m = json.loads((art / "manifest.json").read_text())
    m["variants"][-1]["validation"] = {"passed": False}
    (art / "manifest.json").write_text(json.dumps(m))
    out = tmp_path / "repo"
    err = _refused(capsys, ["triton", str(art), "-o", str(out), "--precision", "int8"], out)
    assert "int8 onnx (not accepted)" in err


def test_one_artifact_of_two_with_nothing_to_serve(art, micro_artifact, tmp_path, capsys):
    add_engine(art, "image")
    add_engine(art, "text")
    bare = copy_artifact(micro_artifact.path, tmp_path / "bare")
    out = tmp_path / "repo"
    err = _refused(capsys, ["triton", str(art), str(bare), "-o", str(out), "--format", "tensorrt"], out)
    assert str(bare) in err and "clipdeploy build" in err


def test_engines_are_served(art, tmp_path, capsys):
    add_engine(art, "image")
    add_engine(art, "text")
    out = tmp_path / "repo"
    assert main(["triton", str(art), "-o", str(out), "--format", "tensorrt"]) == 0
    assert (out / "micro_image_fp16_trt" / "config.pbtxt").is_file()
