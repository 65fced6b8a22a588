"""The matrix page (tools/bench_matrix.py), from synthetic reports: nothing is measured here."""

from __future__ import annotations

from pathlib import Path

from clipdeploy.benchmarks.harness import TimingConfig
from clipdeploy.pipeline import runner
from tools import bench_matrix as matrix_mod  # the repository root is on sys.path (pyproject: pythonpath)
from tools.bench_matrix import MatrixConfig, prepare_artifact, run_matrix

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
    assert "Targets" not in page  # issue #6's table is gone; issue #14's goal replaces it
    assert "**Goal**" in page and page.count("**Goal**") == 1  # ViT-B-32 only
    assert "- note for RN50" in page
    assert [c.precisions for c in seen] == [("fp32", "int8")] * 2
    assert all(c.device == "cpu" for c in seen)


def _fake_impls(monkeypatch, calls, fail=()):
    """Stages that record the config they were given instead of running; those in ``fail`` fail."""
    from clipdeploy.errors import AccuracyError
    from clipdeploy.pipeline.stages import Result

    class Fake:
        def __init__(self, name):
            self.name = name

        def inputs(self, unit, ctx):
            return {"unit": unit.id}

        def run(self, unit, ctx):
            cfg = ctx.plan.export if unit.precision is None else getattr(ctx.plan, unit.stage)[unit.precision]
            calls.append((unit.id, cfg))
            if unit.id in fail:
                raise AccuracyError(f"{unit.id} gate failed")
            return Result({}, {})

        def current(self, unit, ctx, record):
            return True

    monkeypatch.setattr(runner, "IMPLS", {s: Fake(s) for s in ("export", "quantize", "build", "validate", "bench")})


def test_prepare_runs_the_pipeline_and_reports_failures(tmp_path, monkeypatch):
    work = tmp_path / "work"
    calls = []
    _fake_impls(monkeypatch, calls, fail=("quantize:int8",))
    monkeypatch.setattr(matrix_mod, "has_module", lambda name: True)
    cfg = MatrixConfig(work_dir=work, quantize_args=("--calib-images", "/data", "--samples", "64"))
    art, notes = prepare_artifact(cfg, "RN50", "cpu", ("fp32", "int8"))
    assert art == work / "RN50" / "artifact"
    assert [c[0] for c in calls] == ["export", "quantize:int8"]  # no build on a CPU
    export, quantize = calls[0][1], calls[1][1]
    assert export.model == "RN50" and export.output == art and export.pretrained is None
    # The quantize options were parsed by `clipdeploy quantize`'s own parser into its QuantizeConfig.
    assert quantize.calib_images == [Path("/data")] and quantize.samples == 64 and quantize.holdout == 256
    assert quantize.precision == "int8" and quantize.artifact == art and quantize.force
    assert notes == ["quantize:int8 failed, so it was not measured: quantize:int8 gate failed"]
    # A second run: the pipeline's state says the export is current, so nothing runs again.
    calls.clear()
    _fake_impls(monkeypatch, calls)
    art, notes = prepare_artifact(cfg, "RN50", "cpu", ("fp32", "int8"))
    assert [c[0] for c in calls] == ["quantize:int8"] and notes == []


def test_prepare_says_when_the_precision_stage_is_missing(tmp_path, monkeypatch):
    calls = []
    _fake_impls(monkeypatch, calls)
    monkeypatch.setattr(matrix_mod, "has_module", lambda name: False)
    art, notes = prepare_artifact(MatrixConfig(work_dir=tmp_path), "ViT-B-32", "cuda", ("fp32", "int8"))
    assert art == tmp_path / "ViT-B-32" / "artifact" and [c[0] for c in calls] == ["export"]
    assert "not installed" in notes[0] and "only fp32" in notes[0]
    assert "no TensorRT engines" in notes[1]


def test_prepare_builds_engines_on_a_gpu_with_the_build_options(tmp_path, monkeypatch):
    calls = []
    _fake_impls(monkeypatch, calls)
    monkeypatch.setattr(matrix_mod, "has_module", lambda name: True)
    cfg = MatrixConfig(work_dir=tmp_path, build_args=("--batch", "1:4:16", "--device", "cuda:1"))
    prepare_artifact(cfg, "RN50", "cuda", ("fp32", "fp16"))
    built = {unit: c for unit, c in calls if unit.startswith("build:")}
    assert sorted(built) == ["build:fp16", "build:fp32"]
    assert all(c.batch == (1, 4, 16) and c.device == 1 and not c.validate for c in built.values())


def test_an_export_that_fails_is_no_artifact(tmp_path, monkeypatch):
    _fake_impls(monkeypatch, [], fail=("export",))
    art, notes = prepare_artifact(MatrixConfig(work_dir=tmp_path), "nope", "cpu", ("fp32",))
    assert art is None and notes == ["export failed: export gate failed"]


def test_bad_stage_options_are_one_line_errors(tmp_path, monkeypatch):
    import pytest

    from clipdeploy.errors import UsageError

    monkeypatch.setattr(matrix_mod, "has_module", lambda name: True)
    with pytest.raises(UsageError, match="--quantize-args .--samplez 3.*unrecognized arguments: --samplez 3"):
        matrix_mod.model_plan(MatrixConfig(work_dir=tmp_path, quantize_args=("--samplez", "3")), "RN50", "cpu",
                              ("fp32", "int8"))  # fmt: skip


def test_the_matrix_options_share_bench_fields_with_their_own_timing(tmp_path):
    parser = matrix_mod.build_matrix_parser()
    cfg = matrix_mod.config_from_matrix_args(parser.parse_args(["--work-dir", str(tmp_path)]), [])
    assert cfg.timing == matrix_mod.MATRIX_TIMING and cfg.batches == (1, 8, 32) and cfg.device == "auto"
    argv = ["--work-dir", str(tmp_path), "--iters", "7", "--batch", "2,4", "--device", "cpu", "--no-progress"]
    cfg = matrix_mod.config_from_matrix_args(parser.parse_args(argv), argv)
    assert cfg.timing.iters == 7 and cfg.timing.warmup == matrix_mod.MATRIX_TIMING.warmup
    assert cfg.batches == (2, 4) and cfg.device == "cpu" and not cfg.progress
