"""Every path in a manifest stays inside its artifact: absolute paths, `..` and symlinks out are refused
by every reader (load, inspect, embed, validate, build, bench, triton) before any listed file is opened.

Each escape comes with a matching sha256, so a check that only compared sums would let it through.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

import clipdeploy
from clipdeploy.artifact import manifest as manifest_mod
from clipdeploy.cli import main
from clipdeploy.errors import ArtifactError
from clipdeploy.artifact.manifest import file_sha256, read_manifest
from clipdeploy.artifact.schema import resolve_member as resolve_member_path

pytest.importorskip("onnxruntime")


def _copy(src: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(src, tmp / "art"))


def _edit(root: Path, change) -> None:
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def _variant(m: dict[str, Any], tower: str = "image") -> dict[str, Any]:
    return next(v for v in m["variants"] if v["tower"] == tower)


def _outside_copy(root: Path, rel: str, outside: Path) -> str:
    """A copy of an artifact file outside the artifact; returns its sha256 (the same as the original's)."""
    outside.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / rel, outside)
    return file_sha256(outside)


# Each escape: (name, key the error must name, function(root, tmp) that makes it). All are sha-consistent.
def _dotdot_model(root: Path, tmp: Path) -> None:
    _outside_copy(root, "image.fp32.onnx", tmp / "outside.onnx")
    _edit(root, lambda m: _variant(m).update(file="../outside.onnx"))


def _absolute_model(root: Path, tmp: Path) -> None:
    _outside_copy(root, "image.fp32.onnx", tmp / "elsewhere" / "outside.onnx")
    _edit(root, lambda m: _variant(m).update(file=str(tmp / "elsewhere" / "outside.onnx")))


def _symlinked_model(root: Path, tmp: Path) -> None:
    # The manifest is untouched: the file it names is a link out of the artifact.
    _outside_copy(root, "image.fp32.onnx", tmp / "outside.onnx")
    (root / "image.fp32.onnx").unlink()
    os.symlink(tmp / "outside.onnx", root / "image.fp32.onnx")


def _external_data(root: Path, tmp: Path) -> None:
    sha = _outside_copy(root, "image.fp32.onnx", tmp / "outside.data")
    _edit(root, lambda m: _variant(m).update(external_data=[{"file": "../outside.data", "sha256": sha}]))


def _listed_file(root: Path, tmp: Path) -> None:
    sha = _outside_copy(root, "manifest.json", tmp / "passwd")
    _edit(root, lambda m: m["files"].update({str(tmp / "passwd"): sha}))


def _tokenizer_dir_link(root: Path, tmp: Path) -> None:
    # A folder on the way is a link out: tokenizer/ -> a copy outside.
    shutil.copytree(root / "tokenizer", tmp / "tok")
    shutil.rmtree(root / "tokenizer")
    os.symlink(tmp / "tok", root / "tokenizer")


def _tokenizer_file(root: Path, tmp: Path) -> None:
    _outside_copy(root, "tokenizer/bpe_simple_vocab_16e6.txt.gz", tmp / "vocab.txt.gz")
    _edit(root, lambda m: m["tokenizer"]["files"].update(bpe_vocab="tokenizer/../../vocab.txt.gz"))


def _engine_source(root: Path, tmp: Path) -> None:
    _outside_copy(root, "image.fp32.onnx", tmp / "outside.onnx")
    _edit(root, lambda m: _variant(m).update(source="../outside.onnx"))


ESCAPES = {
    "dotdot-model": (_dotdot_model, "variants[0].file"),
    "absolute-model": (_absolute_model, "variants[0].file"),
    "symlinked-model": (_symlinked_model, "variants[0].file"),
    "external-data": (_external_data, "variants[0].external_data[0].file"),
    "listed-file": (_listed_file, "files["),
    "tokenizer-dir-link": (_tokenizer_dir_link, "tokenizer/bpe_simple_vocab_16e6.txt.gz"),
    "tokenizer-file": (_tokenizer_file, "tokenizer.files.bpe_vocab"),
    "engine-source": (_engine_source, "variants[0].source"),
}


@pytest.fixture
def hashed(monkeypatch) -> list[Path]:
    """Every path file_sha256 is asked to read: none may lie outside the artifact."""
    seen: list[Path] = []
    real = manifest_mod.file_sha256

    def spy(path, *a, **k):
        seen.append(Path(path))
        return real(path, *a, **k)

    monkeypatch.setattr(manifest_mod, "file_sha256", spy)
    return seen


def _inside(paths: list[Path], root: Path) -> bool:
    real = root.resolve()
    return all(p.resolve().is_relative_to(real) for p in paths)


@pytest.mark.parametrize("escape", sorted(ESCAPES))
def test_load_refuses_before_opening(escape, micro_artifact, tmp_path, hashed):
    make, key = ESCAPES[escape]
    root = _copy(micro_artifact.path, tmp_path)
    make(root, tmp_path)
    with pytest.raises(ArtifactError) as err:
        clipdeploy.load(root)
    msg = str(err.value)
    assert key in msg and "inside its artifact directory" in msg and "\n" not in msg
    assert _inside(hashed, root), hashed


@pytest.mark.parametrize("escape", sorted(ESCAPES))
def test_inspect_and_embed_exit_2(escape, micro_artifact, tmp_path, capsys):
    make, key = ESCAPES[escape]
    root = _copy(micro_artifact.path, tmp_path)
    make(root, tmp_path)
    for argv in (["inspect", str(root)], ["embed", str(root), "--text", "a cat"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("clipdeploy: error:") and key in err and "\n" not in err, err


@pytest.mark.parametrize("escape", ["dotdot-model", "absolute-model", "symlinked-model", "listed-file", "tokenizer-file"])
def test_triton_refuses_and_copies_nothing(escape, micro_artifact, tmp_path, hashed):
    from clipdeploy.triton.config import TritonConfig
    from clipdeploy.triton.repository import build_repository

    make, key = ESCAPES[escape]
    root = _copy(micro_artifact.path, tmp_path)
    make(root, tmp_path)
    out = tmp_path / "repo"
    with pytest.raises(ArtifactError, match=r"inside its artifact directory") as err:
        build_repository(TritonConfig(artifacts=[root], output=out))
    assert key in str(err.value)
    assert not out.exists() and not list(tmp_path.glob(".repo.*"))  # nothing written, not even a temporary
    assert _inside(hashed, root)


@pytest.mark.parametrize("argv", [["validate"], ["build"], ["bench"]])
def test_validate_build_bench_refuse(argv, micro_artifact, tmp_path, capsys):
    root = _copy(micro_artifact.path, tmp_path)
    _dotdot_model(root, tmp_path)
    assert main([*argv, str(root)]) == 2
    err = capsys.readouterr().err
    assert "variants[0].file" in err and "inside its artifact directory" in err and "Traceback" not in err


def test_verify_files_refuses_entries_that_skip_the_manifest(micro_artifact, tmp_path, hashed):
    # verify_files is also called with pairs built in code: it confines them itself.
    root = _copy(micro_artifact.path, tmp_path)
    sha = _outside_copy(root, "manifest.json", tmp_path / "outside")
    with pytest.raises(ArtifactError, match="climbs out"):
        manifest_mod.verify_files(root, [("../outside", sha)])
    assert hashed == []


@pytest.mark.parametrize(
    "rel, why",
    [
        ("/etc/passwd", "absolute"),
        ("C:\\Windows\\win.ini", "absolute"),
        ("\\\\server\\share\\x", "absolute"),
        ("a/../../x", "climbs out"),
        ("..", "climbs out"),
        ("", "not a relative path"),
        (None, "not a relative path"),
        (3, "not a relative path"),
    ],
)
def test_resolve_member_refuses(rel, why, tmp_path):
    with pytest.raises(ArtifactError, match=why):
        resolve_member_path(tmp_path, rel, "files")


def test_resolve_member_accepts_inner_paths_and_inner_links(tmp_path):
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "a.plan").write_bytes(b"x")
    os.symlink("engines/a.plan", tmp_path / "link.plan")  # a link that stays inside is fine
    assert resolve_member_path(tmp_path, "engines/a.plan", "k") == tmp_path / "engines" / "a.plan"
    assert resolve_member_path(tmp_path, "./link.plan", "k") == tmp_path / "link.plan"


def test_real_export_validates(micro_artifact):
    m = read_manifest(micro_artifact.path)  # the exporter's own output passes schema and path checks
    assert {v["file"] for v in m["variants"]} == {"image.fp32.onnx", "text.fp32.onnx"}


def test_an_artifact_reached_through_a_symlink_still_loads(micro_artifact, tmp_path):
    # Only links that leave the artifact are refused; a link TO the artifact (models/current -> v3) is fine.
    root = _copy(micro_artifact.path, tmp_path)
    os.symlink(root, tmp_path / "current")
    session = clipdeploy.load(tmp_path / "current")
    assert session.encode_text(["a cat"]).shape == (1, 64)


def test_a_symlink_loop_and_the_root_itself_are_refused(micro_artifact, tmp_path):
    root = _copy(micro_artifact.path, tmp_path)
    os.symlink(root / "loop.b", root / "loop.a")
    os.symlink(root / "loop.a", root / "loop.b")
    with pytest.raises(ArtifactError, match="cannot be resolved"):
        resolve_member_path(root, "loop.a", "files")
    with pytest.raises(ArtifactError, match="the artifact directory itself"):
        resolve_member_path(root, ".", "files")
