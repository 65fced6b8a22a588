"""The matrix page, from synthetic reports: nothing is measured here."""

from __future__ import annotations

from pathlib import Path

from clipdeploy.benchmarks import matrix as matrix_mod
from clipdeploy.benchmarks.harness import TimingConfig
from clipdeploy.benchmarks.matrix import MatrixConfig, prepare_artifact, run_matrix
from clipdeploy.manifest import write_manifest

from tests.support.bench_fakes import make_report


def test_page_names_the_machine_and_has_every_model(tmp_path, monkeypatch):
    def fake_prepare(cfg, model, device, precisions):
        if model == "broken":
            return None, ["export failed: unknown model 'broken'"]
        return tmp_path / model, [f"note for {model}"]

    seen = []

    def fake_bench(bench_cfg):
        seen.append(bench_cfg)
        return make_report(bench_cfg.artifact.name)

    monkeypatch.setattr(matrix_mod, "prepare_artifact", fake_prepare)
    monkeypatch.setattr(matrix_mod, "run_bench", fake_bench)
    out = tmp_path / "docs" / "benchmarks.md"
    cfg = MatrixConfig(
        work_dir=tmp_path / "work",
        output=out,
        models=("ViT-B-32", "broken", "RN50"),
        batches=(1, 8),
        timing=TimingConfig(iters=2, warmup=0),
        device="cpu",
        progress=False,
    )
    assert run_matrix(cfg) == out
    page = out.read_text()
    assert page.startswith("# Benchmarks")
    assert "do not edit by hand" in page
    assert "Measured on **Test CPU, 2 cores, 8 GB** (cpu)" in page
    assert "## Summary at batch 8" in page
    assert "| ViT-B-32 | image | onnxruntime fp32 | - | 32.0 |" in page
    assert "## ViT-B-32 on Test CPU" in page and "## RN50 on Test CPU" in page
    assert "- not measured: export failed: unknown model 'broken'" in page
    assert "**Targets**" in page and page.count("**Targets**") == 1  # ViT-B-32 only
    assert "- note for RN50" in page
    assert [c.precisions for c in seen] == [("fp32", "int8")] * 2
    assert all(c.device == "cpu" for c in seen)


def _artifact(path: Path, *precisions: str) -> Path:
    variants = [
        {"tower": t, "precision": p, "format": "onnx", "file": f"{t}.{p}.onnx", "sha256": "0" * 64}
        for t in ("image", "text")
        for p in precisions
    ]
    write_manifest(
        path,
        {
            "schema_version": "1.0",
            "model": {"name": path.name, "embed_dim": 8, "logit_scale": 100.0},
            "towers": {
                t: {
                    "inputs": [{"name": f"{t}_in", "dtype": "float32", "shape": ["batch", 8]}],
                    "outputs": [{"name": f"{t}_embeds", "dtype": "float32", "shape": ["batch", 8]}],
                }
                for t in ("image", "text")
            },
            "preprocess": {
                "size": [8, 8], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0,
            },  # fmt: skip
            "tokenizer": {"kind": "openclip-bpe"},
            "variants": variants,
        },
    )
    return path


def test_prepare_says_when_the_precision_stage_is_missing(tmp_path, monkeypatch):
    work = tmp_path / "work"
    _artifact(work / "ViT-B-32", "fp32")
    calls = []
    monkeypatch.setattr(matrix_mod, "_clipdeploy", lambda *a: calls.append(a) or (0, ""))
    monkeypatch.setattr(matrix_mod, "has_module", lambda name: False)
    art, notes = prepare_artifact(MatrixConfig(work_dir=work), "ViT-B-32", "cpu", ("fp32", "int8"))
    assert art == work / "ViT-B-32" and calls == []  # already exported: no export, nothing to quantize with
    assert "not installed" in notes[0] and "only fp32" in notes[0]


def test_prepare_exports_and_quantizes_and_reports_failures(tmp_path, monkeypatch):
    work = tmp_path / "work"
    calls = []

    def fake_cli(*args):
        calls.append(args)
        if args[0] == "export":
            _artifact(Path(args[3]), "fp32")
            return 0, ""
        return 1, "clipdeploy: error: int8 gate failed"

    monkeypatch.setattr(matrix_mod, "_clipdeploy", fake_cli)
    monkeypatch.setattr(matrix_mod, "has_module", lambda name: True)
    cfg = MatrixConfig(work_dir=work, quantize_args=("--calib-images", "/data"))
    art, notes = prepare_artifact(cfg, "RN50", "cpu", ("fp32", "int8"))
    assert art == work / "RN50"
    assert calls[0][:2] == ("export", "RN50")
    assert calls[1] == ("quantize", str(work / "RN50"), "--precision", "int8", "--calib-images", "/data")
    assert "int8 gate failed" in notes[0]
