"""A missing optional library is a one-line error naming the extra to install, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipdeploy.deps import require
from clipdeploy.errors import DependencyError

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _cli_without(module: str, *argv: str) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter where ``import module`` fails as if it were not installed."""
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "from clipdeploy.cli import main\n"
        f"sys.exit(main({list(argv)!r}))\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_quantize_without_onnx_names_the_extra(micro_artifact, tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(64):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    proc = _cli_without("onnx", "quantize", str(micro_artifact.path), "--precision", "fp16",
                        "--calib-images", str(tmp_path), "--samples", "32", "--holdout", "32", "--min-samples", "32")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(err) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert err[0] == (
        "clipdeploy: error: clipdeploy quantize needs onnx, which is not installed; "
        "install: pip install 'clipdeploy[export]'"
    )


def test_export_without_torch_names_the_extra(tmp_path):
    proc = _cli_without("torch", "export", "micro-vit", "-o", str(tmp_path / "x"))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "needs torch, which is not installed" in proc.stderr and "clipdeploy[export]" in proc.stderr


def test_require_distinguishes_a_missing_dependency_of_a_package(monkeypatch, tmp_path):
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import not_installed_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DependencyError, match=r"needs fakepkg, whose dependency not_installed_dependency_xyz is not"):
        require("fakepkg", "export")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(DependencyError, match=r"pip install 'clipdeploy\[cpu\]' \(or 'clipdeploy\[gpu\]'"):
        require("onnxruntime", "cpu")
    assert require("json", "export").dumps([1]) == "[1]"
