"""tools/gpu-check on a machine without a CUDA GPU: the CPU-side steps run, the missing GPU is one line, exit 0.

Skipped where a GPU is visible: there the check measures for minutes instead (run it by hand)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "gpu-check"


def test_gpu_check_cpu_side_run(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("nvidia-smi is present: the full check runs for minutes here; run tools/gpu-check by hand")
    out = tmp_path / "report"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA GPU here"), p.stdout
    report = json.loads((out / "gpu-check.json").read_text())
    env_report = report["environment"]
    assert set(env_report["modules"]) == {"torch", "tensorrt", "onnxruntime", "cuda.bindings.runtime", "polygraphy"}
    assert env_report.get("torch_cuda_available") in (False, None) and env_report["nvidia_smi"] is None
    # The pytest step ran for real and everything it selected skipped (no GPU), with none failed.
    assert report["pytest"]["rc"] in (0, 5) and "-m gpu or tensorrt tests/engines tests/runtime" in report["pytest"]["cmd"]
    assert "skipped" in report["pytest"]["summary"] and "failed" not in report["pytest"]["summary"]
    assert report["baselines"] == report["tensorrt"] == report["serve"] == "skipped: no CUDA GPU"
    md = (out / "gpu-check.md").read_text()
    assert md.startswith("# gpu-check") and report["pytest"]["summary"] in md and "no CUDA GPU here" in md
    assert "## clipdeploy serve on TensorRT\n\nskipped: no CUDA GPU" in md


def _gpu_check_module():
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_serve_step_on_cpu(micro_artifact, tmp_path):
    """Step 5 (serve on TensorRT) driven on ONNX Runtime instead: the same code, runnable without a GPU."""
    pytest.importorskip("fastapi")
    gpu_check = _gpu_check_module()
    result = gpu_check.serve_step(micro_artifact.path, tmp_path, time.monotonic() + 120, backend="onnxruntime")
    assert "error" not in result, result
    for m in ("image", "text"):
        r = result[m]
        assert r["requests"] == gpu_check.SERVE_REQUESTS and r["items"] == gpu_check.SERVE_REQUESTS, r
        assert r["errors"] == 0 and r["items_per_s"] > 0, r
    assert not gpu_check.serve_failed(result)
    assert gpu_check.serve_failed({**result, "text": {**result["text"], "errors": 1}})
    md = gpu_check.markdown({"started": "now", "seconds": 1, "summary": "ok", "environment": {"modules": {}},
                             "pytest": {"rc": 0, "summary": "x"}, "baselines": "-", "tensorrt": "-", "serve": result})
    assert f"- image: {gpu_check.SERVE_REQUESTS} of {gpu_check.SERVE_REQUESTS} requests right" in md
