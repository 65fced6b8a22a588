"""One context length: the engine profile `clipdeploy build` makes and the check `clipdeploy triton` makes of it
both follow ``ArtifactView.context_length``, for a text tower with a dynamic sequence axis (the tiny artifact)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipdeploy.artifact.manifest import file_sha256, read_manifest, write_manifest
from clipdeploy.artifact.view import ArtifactView
from clipdeploy.engines.builder import axis_ranges
from clipdeploy.engines.config import BuildConfig
from clipdeploy.triton.config import TritonConfig
from clipdeploy.triton.repository import build_repository


def _tiny(root: Path, length: int | None) -> Path:
    pytest.importorskip("onnx", reason="the tiny artifact is written with onnx")
    from tests.support.tiny_artifact import bpe_vocab, make_tiny_artifact

    if bpe_vocab() is None:
        pytest.skip("open_clip's BPE vocabulary (the tiny artifact's tokenizer) is not installed")
    art = make_tiny_artifact(root, precisions=("fp32",))
    if length is not None:  # what the exporter writes for a dynamic-length text tower of this context length
        manifest = read_manifest(art)
        manifest["towers"]["text"].update(
            padding="longest", pooling="argmax", context_length=length, sequence={"min": 1, "max": length}
        )
        manifest["tokenizer"]["context_length"] = length
        write_manifest(art, manifest)
    return art


def _set_engine(art: Path, name: str, profile: dict) -> None:
    """The artifact's one text engine: an entry recording ``profile`` as build_plan does, a stand-in plan file."""
    manifest = read_manifest(art)
    manifest["variants"] = [v for v in manifest["variants"] if v["format"] != "tensorrt"]
    rel = f"engines/{name}.plan"
    (art / "engines").mkdir(exist_ok=True)
    (art / rel).write_bytes(b"stand-in plan")
    manifest["variants"].append({
        "tower": "text", "precision": "fp32", "format": "tensorrt", "file": rel, "sha256": file_sha256(art / rel),
        "bytes": 13, "source": "text.fp32.onnx", "tensorrt_version": "10.13.3", "gpu": "NVIDIA H100",
        "compute_capability": "9.0", "hardware_compatibility": "none", "version_compatible": False,
        "profile": profile, "validation": {"passed": True, "min_cosine": 0.9999},
    })  # fmt: skip
    write_manifest(art, manifest)


def _profile(view: ArtifactView, cfg: BuildConfig) -> dict:
    ranges = axis_ranges("text", [("input_ids", (-1, -1))], view, cfg)
    return {n: {"min": list(lo), "opt": list(opt), "max": list(hi)} for n, ((lo, opt, hi), _) in ranges.items()}


def _token_warnings(art: Path, out: Path) -> list[str]:
    summary = build_repository(TritonConfig(artifacts=[art], output=out, formats=("tensorrt",)))
    return [w for w in summary["warnings"] if "tokens" in w]


# None: the tiny artifact as made (only the tokenizer records 77); 64 and 77: text tower and tokenizer record it.
@pytest.mark.parametrize("length", [None, 64, 77])
def test_engine_profile_and_triton_config_follow_the_views_context_length(tmp_path, length):
    art = _tiny(tmp_path / "art", length)
    view = ArtifactView.read(art)
    context = view.context_length
    assert context == (length or 77)
    # The builder's default sequence range ends at the view's context length, and so may a chosen one.
    default = _profile(view, BuildConfig(art))
    assert default["input_ids"]["max"] == [64, context]
    _set_engine(art, "text.fp32.full", default)
    assert _token_warnings(art, tmp_path / "repo-full") == []  # Triton finds the engine takes the full width
    # An engine cut below the context length: Triton names the same context length and the range to rebuild with.
    short = _profile(view, BuildConfig(art, shapes={"sequence": (1, 8, context - 1)}))
    _set_engine(art, "text.fp32.short", short)
    (warning,) = _token_warnings(art, tmp_path / "repo-short")
    assert f"takes at most {context - 1} tokens, but the tokenize model sends {context}" in warning, warning
    assert f"--seq-len 1:OPT:{context}" in warning, warning
