"""A build killed while writing a plan leaves a plan-sized temporary in engines/: the next build removes it."""

from __future__ import annotations

import sys

from clipdeploy.cli import main
from clipdeploy.runtime import cuda


def _no_tensorrt(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as if it were not installed, even where it is
    monkeypatch.setattr(cuda, "gpu_present", lambda: True)  # on a GPU machine: the error names TensorRT


def test_next_build_removes_a_dead_writers_plan_temporary(tiny_artifact, capsys, monkeypatch):
    _no_tensorrt(monkeypatch)
    engines = tiny_artifact / "engines"
    engines.mkdir()
    dead = engines / ".image.fp16.sm90.trt11.plan.0a1b2c3d.tmp"
    dead.write_bytes(b"\0" * 4096)
    mine = engines / "notes.txt"
    mine.write_text("keep")
    assert main(["build", str(tiny_artifact), "--precision", "fp16"]) == 2  # no TensorRT here: stops after cleaning
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert not dead.exists() and mine.read_text() == "keep"
