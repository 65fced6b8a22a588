"""Incremental runs, failure isolation and the stage state, with stage work faked (see tests/support/pipeline_fakes.py).

The keys are the real ones: hashes of the real checkpoint file, calibration images and config values.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from tests.support.pipeline_fakes import IMAGES, calib_dir, fake_gpu, write_config

from clipdeploy.cli import main
from clipdeploy.errors import UsageError
from clipdeploy.pipeline import stages
from clipdeploy.pipeline.config import load_config
from clipdeploy.pipeline.runner import RunOptions, run_pipeline
from clipdeploy.pipeline.state import STATE_NAME

CONFIG = """
version: 1
output: out
defaults:
  precisions: [fp16, int8]
  quantize:
    calib_images: [calib]
    samples: 4
    holdout: 32
    min_samples: 4
  build:
    batch: "1:8:32"
models:
  - name: alpha
    model: micro-vit
    checkpoint: alpha.pt
  - name: beta
    model: micro-vit
    quantize:
      int8: {samples: 5}
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    calib_dir(tmp_path)
    (tmp_path / "alpha.pt").write_bytes(b"weights v1")
    write_config(tmp_path, CONFIG)
    return tmp_path


def _run(project: Path, **options) -> dict:
    return run_pipeline(load_config(project / "pipeline.yaml"), RunOptions(**options))


def _status(summary: dict, model: str) -> dict[str, str]:
    m = next(m for m in summary["models"] if m["name"] == model)
    return {u["unit"]: u["status"] for u in m["units"]}


def _unit(summary: dict, model: str, unit: str) -> dict:
    m = next(m for m in summary["models"] if m["name"] == model)
    return next(u for u in m["units"] if u["unit"] == unit)


def _ran(summary: dict, model: str) -> set[str]:
    return {u for u, s in _status(summary, model).items() if s == "ran"}


ALL_CPU = {"export", "quantize:fp16", "quantize:int8", "bench"}
REAL_MACHINE = stages._machine  # captured before the `fake` fixture replaces it


def test_first_run_runs_everything_and_skips_engines_without_tensorrt(project, fake):
    summary = _run(project)
    assert summary["ok"]
    for model in ("alpha", "beta"):
        status = _status(summary, model)
        assert _ran(summary, model) == ALL_CPU
        for unit in ("build:fp16", "build:int8", "validate:fp16", "validate:int8"):
            assert status[unit] == "skipped"
            assert "TensorRT" in _unit(summary, model, unit)["reason"]
    assert json.loads((project / "out" / "summary.json").read_text())["counts"]["ran"] == 8


def test_second_run_skips_everything_in_seconds(project, fake):
    _run(project)
    fake.ran.clear()
    start = time.perf_counter()
    summary = _run(project)
    seconds = time.perf_counter() - start
    assert fake.ran == []
    assert summary["counts"]["current"] == 8 and summary["counts"]["ran"] == 0, summary["counts"]
    assert seconds < 5, f"a fully current run took {seconds:.1f}s"


def test_config_value_reruns_only_that_quantize_and_what_follows(project, fake):
    _run(project)
    text = (project / "pipeline.yaml").read_text().replace("int8: {samples: 5}", "int8: {samples: 6}")
    (project / "pipeline.yaml").write_text(text)
    summary = _run(project)
    assert _ran(summary, "alpha") == set()
    assert _ran(summary, "beta") == {"quantize:int8", "bench"}
    assert _unit(summary, "beta", "quantize:int8")["changed"] == ["samples"]
    assert _status(summary, "beta")["quantize:fp16"] == "current"
    assert _status(summary, "beta")["export"] == "current"


def test_calibration_data_reruns_quantize_not_export(project, fake):
    _run(project)
    calib = project / "calib"
    (calib / "chelsea.jpg").write_bytes((IMAGES / "rocket.jpg").read_bytes())  # same name, other photo
    summary = _run(project)
    for model in ("alpha", "beta"):
        assert _ran(summary, model) == {"quantize:fp16", "quantize:int8", "bench"}
        assert _unit(summary, model, "quantize:fp16")["changed"] == ["calib_images"]
        assert _status(summary, model)["export"] == "current"
    # An added image counts too.
    shutil.copyfile(IMAGES / "coins.jpg", calib / "extra.jpg")
    assert _ran(_run(project), "alpha") == {"quantize:fp16", "quantize:int8", "bench"}


def test_weights_rerun_that_model_from_export(project, fake):
    _run(project)
    (project / "alpha.pt").write_bytes(b"weights v2")
    summary = _run(project)
    assert _ran(summary, "alpha") == ALL_CPU
    assert _unit(summary, "alpha", "export")["changed"] == ["checkpoint"]
    assert _unit(summary, "alpha", "quantize:fp16")["changed"] == ["export"]
    assert _ran(summary, "beta") == set()


def test_tool_version_change_reruns_the_stages_that_use_the_tool(project, fake, monkeypatch):
    _run(project)
    real = stages.versions

    def newer_onnxruntime(*dists):
        found = real(*dists)
        if "onnxruntime" in found:
            found["onnxruntime"] = "99.0"
        return found

    monkeypatch.setattr(stages, "versions", newer_onnxruntime)
    summary = _run(project)
    assert _ran(summary, "alpha") == {"quantize:fp16", "quantize:int8", "bench"}
    assert "tools.onnxruntime" in _unit(summary, "alpha", "quantize:fp16")["changed"]
    assert _status(summary, "alpha")["export"] == "current"


def test_engines_are_keyed_by_gpu_tensorrt_and_build_settings(project, fake, monkeypatch):
    fake_gpu(monkeypatch)
    summary = _run(project)
    assert _ran(summary, "alpha") == ALL_CPU | {"build:fp16", "build:int8", "validate:fp16", "validate:int8"}
    assert _run(project)["counts"]["ran"] == 0
    # Another TensorRT version: engines and their validation, and the bench that measures them.
    fake_gpu(monkeypatch, version="10.13.2")
    summary = _run(project)
    assert _ran(summary, "alpha") == {"build:fp16", "build:int8", "validate:fp16", "validate:int8"}
    assert "target.tensorrt" in _unit(summary, "alpha", "build:fp16")["changed"]
    # A build setting: only the builds whose engines change, and what validates and measures them.
    text = (project / "pipeline.yaml").read_text().replace('batch: "1:8:32"', 'batch: "1:8:64"')
    (project / "pipeline.yaml").write_text(text)
    summary = _run(project)
    assert _ran(summary, "alpha") == {"build:fp16", "build:int8", "validate:fp16", "validate:int8", "bench"}
    assert _unit(summary, "alpha", "build:int8")["changed"] == ["batch"]
    assert _status(summary, "alpha")["quantize:int8"] == "current"


def test_a_broken_model_fails_alone_and_the_run_exits_1(tmp_path, fake, capsys):
    calib_dir(tmp_path)
    (tmp_path / "good.pt").write_bytes(b"weights")
    (tmp_path / "broken.pt").write_bytes(b"garbage, not a checkpoint")
    write_config(
        tmp_path,
        """
        output: out
        defaults:
          precisions: [fp16]
          quantize: {calib_images: calib, samples: 4, holdout: 32, min_samples: 4}
        models:
          - {name: one, model: micro-vit, checkpoint: good.pt}
          - {name: broken, model: micro-vit, checkpoint: broken.pt}
          - {name: two, model: micro-vit, seed: 3}
    """.replace("seed: 3", "export: {seed: 3}"),
    )
    code = main(["run", str(tmp_path / "pipeline.yaml")])
    out = capsys.readouterr()
    assert code == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert not summary["ok"]
    assert _status(summary, "broken")["export"] == "failed"
    assert "corrupt" in _unit(summary, "broken", "export")["reason"]
    assert _status(summary, "broken")["quantize:fp16"] == "blocked"
    assert _status(summary, "broken")["bench"] == "blocked"
    for good in ("one", "two"):
        assert _ran(summary, good) == {"export", "quantize:fp16", "bench"}
    table = out.out
    assert "broken" in table and "failed" in table and "FAILED:" in table
    assert (tmp_path / "out" / "one" / "artifact" / "manifest.json").is_file()
    assert not (tmp_path / "out" / "broken" / "artifact").exists()


def test_fail_fast_stops_everything_after_the_first_failure(tmp_path, fake):
    calib_dir(tmp_path)
    (tmp_path / "broken.pt").write_bytes(b"garbage")
    write_config(
        tmp_path,
        """
        output: out
        defaults:
          precisions: [fp16]
          quantize: {calib_images: calib, samples: 4, holdout: 32, min_samples: 4}
        models:
          - {name: broken, model: micro-vit, checkpoint: broken.pt}
          - {name: later, model: micro-vit}
    """,
    )
    summary = run_pipeline(load_config(tmp_path / "pipeline.yaml"), RunOptions(fail_fast=True))
    assert fake.units("later") == []
    assert set(_status(summary, "later").values()) == {"blocked"}
    assert "--fail-fast" in _unit(summary, "later", "export")["reason"]


def test_a_failed_gate_blocks_only_what_needs_it(project, fake):
    text = (project / "pipeline.yaml").read_text().replace("int8: {samples: 5}", "int8: {min_mean_cosine: 1.0}")
    (project / "pipeline.yaml").write_text(text)
    summary = _run(project)
    assert _status(summary, "beta")["quantize:int8"] == "failed"
    assert _unit(summary, "beta", "quantize:int8")["figures"]["image"]["mean_cosine"] == 0.99
    assert _status(summary, "beta")["quantize:fp16"] == "ran"
    assert _status(summary, "beta")["bench"] == "blocked"
    assert _ran(summary, "alpha") == ALL_CPU


def test_a_unit_killed_half_way_leaves_no_record(project, fake):
    _run(project)
    (project / "calib" / "chelsea.jpg").write_bytes((IMAGES / "rocket.jpg").read_bytes())
    fake.interrupt = "quantize:int8"
    with pytest.raises(KeyboardInterrupt):
        _run(project)
    state = json.loads((project / "out" / "alpha" / STATE_NAME).read_text())
    assert "quantize:int8" not in state["units"]  # dropped before it ran, never written back
    assert "quantize:fp16" in state["units"] and "export" in state["units"]
    assert not list((project / "out" / "alpha").glob(f".{STATE_NAME}*.tmp"))
    fake.interrupt = None
    summary = _run(project)
    assert _ran(summary, "alpha") == {"quantize:int8", "bench"}
    assert _unit(summary, "alpha", "quantize:int8")["reason"] == "first run"


def test_changed_outputs_make_a_unit_stale(project, fake):
    _run(project)
    (project / "out" / "alpha" / "artifact" / "image.int8.onnx").write_text("tampered")
    summary = _run(project)
    assert _ran(summary, "alpha") == {"quantize:int8"}
    assert _unit(summary, "alpha", "quantize:int8")["reason"] == "outputs missing or changed"
    # The re-made variant is the same file again, so what measured it is still current.
    assert _status(summary, "alpha")["bench"] == "current"


def test_force_and_only(project, fake):
    _run(project)
    summary = _run(project, force=True, only="quantize")
    assert _ran(summary, "alpha") == {"quantize:fp16", "quantize:int8"}
    assert _status(summary, "alpha")["export"] == "current"
    assert _status(summary, "alpha")["bench"] == "current"  # the forced re-runs made the same files
    assert _ran(_run(project, force=True, models=("beta",)), "beta") == ALL_CPU
    # A selected stage whose input is out of date fails, and says what to do.
    (project / "alpha.pt").write_bytes(b"weights v3")
    summary = _run(project, only="quantize")
    assert _status(summary, "alpha")["export"] == "stale"
    assert "changed: checkpoint" in _unit(summary, "alpha", "export")["reason"]
    assert _status(summary, "alpha")["quantize:fp16"] == "failed"
    assert "--only export" in _unit(summary, "alpha", "quantize:fp16")["reason"]
    assert not summary["ok"]


def test_bad_options_are_usage_errors(project, fake, capsys):
    with pytest.raises(UsageError, match="--model 'gamma'"):
        _run(project, models=("gamma",))
    with pytest.raises(UsageError, match="--only 'deploy'"):
        _run(project, only="deploy")
    assert main(["run", str(project / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_summary_json_is_machine_readable(project, fake):
    summary = _run(project)
    data = json.loads((project / "out" / "summary.json").read_text())
    assert data["schema"] == "clipdeploy-pipeline-summary/1"
    assert set(data["counts"]) == {"ran", "current", "skipped", "stale", "failed", "blocked"}
    unit = data["models"][0]["units"][0]
    assert set(unit) >= {"unit", "stage", "precision", "status", "seconds", "reason", "key", "figures", "changed"}
    assert data["models"][0]["artifact"].endswith("out/alpha/artifact")
    assert summary["file"].endswith("summary.json")


def test_a_cuda_bench_without_a_gpu_is_skipped_not_failed(project, fake, monkeypatch):
    from clipdeploy.benchmarks import environment

    monkeypatch.setattr(stages, "_machine", REAL_MACHINE)
    monkeypatch.setattr(environment, "gpus", lambda: [])
    text = (project / "pipeline.yaml").read_text().replace("models:", "  bench: {device: cuda}\nmodels:", 1)
    (project / "pipeline.yaml").write_text(text)
    summary = _run(project)
    assert summary["ok"]
    bench = _unit(summary, "alpha", "bench")
    assert bench["status"] == "skipped" and "no NVIDIA GPU" in bench["reason"]
