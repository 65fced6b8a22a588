"""gpus() and gpu_memory_mb() read nvidia-smi through one helper; a fake nvidia-smi stands in for the driver."""

from __future__ import annotations

import os
import stat

import pytest

from clipdeploy.benchmarks import environment, harness

FAKE = """#!/bin/sh
case "$1" in
  --query-gpu=*) echo "NVIDIA H200, 570.1, 143771 MiB" ;;
  --query-compute-apps=*) [ "$2" = "--format=csv,noheader,nounits" ] || exit 3
                          echo "41, 100"; echo "42, 2048"; echo "42, 512" ;;
  *) exit 9 ;;
esac
"""


@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
    path = tmp_path / "nvidia-smi"
    path.write_text(FAKE, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")


def test_gpus_and_per_process_memory_from_nvidia_smi(fake_smi):
    assert environment.gpus() == [{"name": "NVIDIA H200", "driver": "570.1", "memory": "143771 MiB"}]
    assert harness.gpu_memory_mb(42) == 2560.0
    assert harness.gpu_memory_mb(7) is None


def test_without_nvidia_smi(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert environment.gpus() == [] and harness.gpu_memory_mb() is None
