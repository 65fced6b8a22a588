"""The coverage sweep (tools/coverage.py): model selection, a resumable cache, and the Markdown report."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import coverage  # the repository root is on sys.path (pyproject: pythonpath)

ROOT = Path(__file__).resolve().parents[2]

MODELS = ["RN50", "RN50-quickgelu", "RN50x4", "ViT-B-32", "ViT-B-32-256", "EVA02-E-14"]


def test_select_exact_glob_and_substring():
    assert coverage.select(MODELS, ["RN50"]) == ["RN50"]  # an exact name is just that one
    assert coverage.select(MODELS, ["RN50*"]) == ["RN50", "RN50-quickgelu", "RN50x4"]
    assert coverage.select(MODELS, ["b-32"]) == ["ViT-B-32", "ViT-B-32-256"]
    assert coverage.select(MODELS, None) == MODELS


def _row(model, status="passed"):
    tower = {"passed": status == "passed", "min_cosine": 0.99999999, "max_abs_err": 1e-6, "abs_err_rel": 1e-7}
    return {"model": model, "status": status, "family": "vit", "size": "full size", "seconds": 1.0,
            "export_seconds": 1.0, "towers": {"image": tower, "text": tower}, "onnx_bytes": {"image": 4e8, "text": 2.5e8},
            "tokenizer": {"kind": "openclip-bpe"}, "pooling": "argmax", "padding": "longest", "peak_rss_gb": 2.0}


def test_sweep_is_resumable_and_writes_the_report(tmp_path, monkeypatch):
    ran = []

    def fake(model, reduced_depth, timeout):
        ran.append(model)
        return _row(model, "failed" if model == "RN50x4" else "passed")

    monkeypatch.setattr(coverage, "_run_in_subprocess", fake)
    monkeypatch.setattr(coverage, "list_architectures", lambda: MODELS)
    cache, report = tmp_path / "c.json", tmp_path / "c.md"
    coverage.sweep(["RN50", "RN50x4"], cache_path=cache, report_path=report, reduced_depth=False, rerun=False, timeout=9)
    coverage.sweep(["RN50", "ViT-B-32"], cache_path=cache, report_path=report, reduced_depth=False, rerun=False,
                   timeout=9)
    assert ran == ["RN50", "RN50x4", "ViT-B-32"]  # RN50 came from the cache the second time
    assert set(json.loads(cache.read_text())["rows"]) == {"RN50", "RN50x4", "ViT-B-32"}
    md = report.read_text()
    assert "run so far: **3**; not run yet: **3**" in md
    assert "both towers within tolerance: **2**" in md and "failed the gate: **1**" in md
    assert "| RN50 | vit | passed | pass | 1 - 1e-08 |" in md
    assert "| EVA02-E-14 | | not run |" in md
    assert md.count("\n| ") == len(MODELS) + 1  # one row per architecture, plus the header


def test_parallel_jobs_keep_every_row_and_run_heavy_models_alone(tmp_path, monkeypatch):
    import threading
    import time

    running, peak, heavy_beside = [], [0], []
    guard = threading.Lock()

    def fake(model, reduced_depth, timeout):
        with guard:
            running.append(model)
            peak[0] = max(peak[0], len(running))
            if coverage.is_heavy(model) and len(running) > 1:
                heavy_beside.append(model)
        time.sleep(0.05)
        with guard:
            running.remove(model)
        return _row(model)

    monkeypatch.setattr(coverage, "_run_in_subprocess", fake)
    monkeypatch.setattr(coverage, "list_architectures", lambda: MODELS + ["ViT-H-14"])
    cache, report = tmp_path / "c.json", tmp_path / "c.md"
    models = ["RN50", "RN50-quickgelu", "RN50x4", "ViT-B-32", "ViT-H-14"]
    coverage.sweep(models, cache_path=cache, report_path=report, reduced_depth=False, rerun=False, timeout=9, jobs=2)
    rows = json.loads(cache.read_text())["rows"]
    assert set(rows) == set(models)
    assert peak[0] == 2 and heavy_beside == []
    assert rows["RN50"]["concurrent_exports"] == 2 and rows["ViT-H-14"]["concurrent_exports"] == 1
    assert "| RN50 | vit | passed |" in report.read_text() and " † |" in report.read_text()


def test_a_broken_worker_is_an_error_row_and_ctrl_c_records_nothing(tmp_path, monkeypatch):
    ran = []

    def fake(model, reduced_depth, timeout):
        ran.append(model)
        if model == "RN50x4":
            raise ValueError("row.json is not JSON")
        if model == "ViT-B-32":
            raise KeyboardInterrupt
        return _row(model)

    monkeypatch.setattr(coverage, "_run_in_subprocess", fake)
    monkeypatch.setattr(coverage, "list_architectures", lambda: MODELS)
    cache, report = tmp_path / "c.json", tmp_path / "c.md"
    models = ["RN50", "RN50x4", "ViT-B-32", "ViT-B-32-256"]
    with pytest.raises(KeyboardInterrupt):
        coverage.sweep(models, cache_path=cache, report_path=report, reduced_depth=False, rerun=False, timeout=9,
                       jobs=1)
    rows = json.loads(cache.read_text())["rows"]
    assert rows["RN50"]["status"] == "passed"
    assert rows["RN50x4"]["status"] == "error" and "not JSON" in rows["RN50x4"]["error"]
    assert "ViT-B-32" not in rows, "an interrupted export is not recorded, so a resume runs it again"
    assert "ViT-B-32-256" not in ran


def test_heavy_models_are_told_by_name_or_config():
    # by name (ViT-H and up) and by config: NLLB-1.3B text, ViTamin-XL, a SigLIP2 large text tower
    for model in ("ViT-H-14", "ViT-bigG-14", "EVA02-E-14", "nllb-clip-large", "ViTamin-XL-256", "ViT-L-16-SigLIP2-512"):
        assert coverage.is_heavy(model), model
    for model in ("RN50", "ViT-B-32", "ViT-L-14", "convnext_base", "mt5-base-ViT-B-32"):
        assert not coverage.is_heavy(model), model
    assert coverage.is_heavy("no-such-architecture"), "an unknown size runs alone"


def test_two_sweeps_on_one_cache_keep_each_others_rows(tmp_path, monkeypatch):
    """A second sweep that loaded the cache earlier must not overwrite rows the first one added since."""
    monkeypatch.setattr(coverage, "list_architectures", lambda: MODELS)
    cache = tmp_path / "c.json"
    coverage.record_row(cache, _row("RN50"))
    stale = coverage.load_cache(cache)  # what a second sweep read at its start
    coverage.record_row(cache, _row("RN50x4"))
    merged = coverage.record_row(cache, _row("ViT-B-32"))
    assert set(stale["rows"]) == {"RN50"}
    assert set(merged["rows"]) == {"RN50", "RN50x4", "ViT-B-32"}


def test_report_only_from_the_command_line(tmp_path):
    """`python tools/coverage.py --report-only` rewrites the report from the cache, without open_clip."""
    cache = tmp_path / "c.json"
    cache.write_text(json.dumps({"rows": {"ViT-B-32": _row("ViT-B-32")}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, str(ROOT / "tools" / "coverage.py"), "--report-only", "--cache", str(cache),
           "--report", str(tmp_path / "r.md")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "r.md").read_text()
    assert "| ViT-B-32 | vit | passed |" in report
    assert "Regenerate with `python tools/coverage.py`" in report


def test_the_developer_tools_are_not_in_the_package():
    from clipdeploy.cli import build_parser

    assert importlib.util.find_spec("clipdeploy.export.coverage") is None
    assert importlib.util.find_spec("clipdeploy.benchmarks.matrix") is None
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert "coverage" not in sub.choices and "run" in sub.choices


def test_reduced_depth_is_only_for_the_giants():
    assert set(coverage.GIANTS) == {"EVA02-E-14", "EVA02-E-14-plus", "ViT-e-14"}


def test_the_committed_report_is_what_the_committed_cache_renders(tmp_path, monkeypatch):
    """docs/coverage.md regenerates from docs/coverage.json (`--report-only`) and is not edited by hand."""
    pytest.importorskip("open_clip")
    # open_clip's own architectures, in its order, without the micro models other tests register with it.
    rows = json.loads((ROOT / "docs" / "coverage.json").read_text(encoding="utf-8"))["rows"]
    listed = coverage.list_architectures()
    monkeypatch.setattr(coverage, "list_architectures", lambda: [m for m in listed if m in rows])
    coverage.write_report(coverage.load_cache(ROOT / "docs" / "coverage.json"), tmp_path / "coverage.md")
    assert (tmp_path / "coverage.md").read_text(encoding="utf-8") == (ROOT / "docs" / "coverage.md").read_text(
        encoding="utf-8"
    )
