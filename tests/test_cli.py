"""The CLI: every command's output and help, and one-line errors with the documented exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import clipdeploy
from clipdeploy.cli import main

from tests.support.testdata import MICRO_CONFIG

SAMPLES = sorted((Path(clipdeploy.__file__).parent / "data" / "images").glob("*.jpg"))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, expected_code: int, *needles: str) -> None:
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("clipdeploy: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("command", ["export", "embed", "inspect", "models"])
def test_every_command_has_help(command):
    result = subprocess.run(
        [sys.executable, "-m", "clipdeploy.cli", command, "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert "usage: clipdeploy " + command in result.stdout
    assert len(result.stdout.splitlines()) > 5


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "clipdeploy"
    if not exe.exists():
        pytest.skip(f"no console script beside {sys.executable}: the package is not pip-installed here")
    result = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=False)
    assert result.stdout.strip() == f"clipdeploy {clipdeploy.__version__}"


def test_embed_prints_json(micro_artifact, capsys):
    code, out, err = run(capsys, "embed", str(micro_artifact.path), "--image", str(SAMPLES[0]), str(SAMPLES[1]),
                         "--text", "a cat", "a dog", "a car")
    assert code == 0, err
    result = json.loads(out)
    assert result["variants"] == {"image": "fp32", "text": "fp32"}
    emb = np.array(result["image"]["embeddings"])
    assert emb.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    probs = np.array(result["similarity"]["probs"])
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    session = clipdeploy.load(micro_artifact.path)
    np.testing.assert_allclose(emb, session.encode_image(SAMPLES[:2]), atol=1e-6)


def test_embed_writes_npy(micro_artifact, tmp_path, capsys):
    code, out, err = run(capsys, "embed", str(micro_artifact.path), "--text", "a cat", "-o", str(tmp_path / "out"))
    assert code == 0, err
    arr = np.load(tmp_path / "out" / "text.npy")
    assert arr.shape == (1, 64) and arr.dtype == np.float32
    assert json.loads(out)["text"]["shape"] == [1, 64]
    assert not (tmp_path / "out" / "image.npy").exists()


def test_inspect(micro_artifact, capsys):
    code, out, err = run(capsys, "inspect", str(micro_artifact.path))
    assert code == 0, err
    assert "micro-vit" in out and "checkpoint micro-vit.pt" in out
    assert "image pixel_values float32 [batch, 3, 64, 64] -> image_embeds float32 [batch, 64]" in out
    assert "image.fp32.onnx" in out and "pass" in out
    code, out, _ = run(capsys, "inspect", str(micro_artifact.path), "--json")
    assert json.loads(out)["model"]["name"] == "micro-vit"


def test_models_lists_architectures_and_tags(capsys):
    pytest.importorskip("open_clip")
    code, out, _ = run(capsys, "models")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "openai" in lines["ViT-B-32"] and "openai" in lines["RN50"]
    code, out, _ = run(capsys, "models", "RN50", "--json")
    assert {r["model"] for r in json.loads(out)} >= {"RN50", "RN50-quickgelu"}


def test_export_then_embed_through_the_cli(tmp_path, capsys):
    pytest.importorskip("open_clip")
    out_dir = tmp_path / "art"
    code, out, err = run(capsys, "export", "micro-vit", "--model-config", str(MICRO_CONFIG), "-o", str(out_dir))
    assert code == 0, err
    assert "min cosine" in out and "random weights" in out
    code, out, err = run(capsys, "embed", str(out_dir), "--text", "hello")
    assert code == 0, err


# ---- one-line errors ------------------------------------------------------------------------------


def test_error_unknown_model(tmp_path, capsys):
    pytest.importorskip("open_clip")
    code, _, err = run(capsys, "export", "ViT-B-322", "-o", str(tmp_path / "x"))
    assert_one_line_error(code, err, 2, "unknown model 'ViT-B-322'", "ViT-B-32")


def test_error_unknown_tag(tmp_path, capsys):
    pytest.importorskip("open_clip")
    code, _, err = run(capsys, "export", "RN50", "--pretrained", "bogus", "-o", str(tmp_path / "x"))
    assert_one_line_error(code, err, 2, "'bogus'", "valid tags:", "openai")


def test_error_missing_and_corrupt_checkpoint(tmp_path, capsys):
    pytest.importorskip("open_clip")
    code, _, err = run(capsys, "export", "RN50", "--checkpoint", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "x"))
    assert_one_line_error(code, err, 2, "nope.pt", "does not exist")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    code, _, err = run(capsys, "export", "micro-vit", "--model-config", str(MICRO_CONFIG), "--checkpoint", str(bad),
                       "-o", str(tmp_path / "x"))
    assert_one_line_error(code, err, 2, "bad.pt", "not a PyTorch or safetensors file")
    assert not (tmp_path / "x").exists()


def test_error_existing_output(micro_artifact, capsys):
    pytest.importorskip("open_clip")
    code, _, err = run(capsys, "export", "micro-vit", "--model-config", str(MICRO_CONFIG), "-o", str(micro_artifact.path))
    assert_one_line_error(code, err, 2, str(micro_artifact.path), "--force")


def test_error_unreadable_image(micro_artifact, tmp_path, capsys):
    bad = tmp_path / "cat.png"
    bad.write_bytes(b"not a png")
    code, _, err = run(capsys, "embed", str(micro_artifact.path), "--image", str(bad))
    assert_one_line_error(code, err, 2, "cat.png")
    code, _, err = run(capsys, "embed", str(micro_artifact.path), "--image", str(tmp_path / "missing.jpg"))
    assert_one_line_error(code, err, 2, "missing.jpg")


def test_error_empty_text_list(micro_artifact, capsys):
    code, _, err = run(capsys, "embed", str(micro_artifact.path), "--text")
    assert_one_line_error(code, err, 2, "--text", "at least one")
    code, _, err = run(capsys, "embed", str(micro_artifact.path))
    assert_one_line_error(code, err, 2, "nothing to embed")


def test_error_missing_or_corrupt_manifest(micro_artifact, tmp_path, capsys):
    code, _, err = run(capsys, "inspect", str(tmp_path))
    assert_one_line_error(code, err, 2, "manifest.json", "is missing")
    (tmp_path / "manifest.json").write_text("[1, 2")
    code, _, err = run(capsys, "embed", str(tmp_path), "--text", "x")
    assert_one_line_error(code, err, 2, "corrupt")


def test_error_checksum_mismatch(micro_artifact, tmp_path, capsys):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(micro_artifact.path, root)
    with open(root / "text.fp32.onnx", "ab") as f:
        f.write(b"tampered")
    code, _, err = run(capsys, "embed", str(root), "--text", "x")
    assert_one_line_error(code, err, 2, "text.fp32.onnx", "sha256")


def test_verbose_shows_the_traceback(tmp_path, capsys):
    code, _, err = run(capsys, "--verbose", "inspect", str(tmp_path / "none"))
    assert code == 2 and "Traceback" in err and "clipdeploy: error:" in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["export"])
    assert info.value.code == 2
