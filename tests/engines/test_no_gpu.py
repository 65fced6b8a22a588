"""On a machine without a GPU, `build`, `validate`, `run` and backend='tensorrt' say that there is no GPU;
they name TensorRT only where a GPU exists and TensorRT does not. The GPU probe asks the driver, through
paths the tests point at stand-ins."""

from __future__ import annotations

import sys

import pytest

from clipdeploy.cli import main
from clipdeploy.errors import DependencyError
from clipdeploy.pipeline import stages
from clipdeploy.runtime import cuda
from clipdeploy.runtime.tensorrt_compat import import_tensorrt


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A machine whose driver lists ``gpus`` GPUs (0: none), without TensorRT."""

    def make(gpus: int) -> None:
        proc = tmp_path / "proc-gpus"
        proc.mkdir(exist_ok=True)
        for i in range(gpus):
            (proc / f"0000:0{i}:00.0").mkdir()
        monkeypatch.setattr(cuda, "PROC_GPUS", proc)
        monkeypatch.setattr(cuda, "NVIDIA_SMI", str(tmp_path / "no-nvidia-smi"))
        monkeypatch.setitem(sys.modules, "tensorrt", None)  # as if it were not installed, even where it is
        stages._TARGETS.clear()

    return make


def test_gpu_probe_reads_the_driver(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda, "PROC_GPUS", tmp_path / "absent")
    monkeypatch.setattr(cuda, "NVIDIA_SMI", str(tmp_path / "absent-smi"))
    assert cuda.gpu_present() is False
    (tmp_path / "proc").mkdir()
    monkeypatch.setattr(cuda, "PROC_GPUS", tmp_path / "proc")
    assert cuda.gpu_present() is False  # the driver is loaded but lists no GPU
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    smi.chmod(0o755)
    monkeypatch.setattr(cuda, "NVIDIA_SMI", str(smi))
    assert cuda.gpu_present() is True
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver'\nexit 9\n")
    assert cuda.gpu_present() is False
    (tmp_path / "proc" / "0000:01:00.0").mkdir()
    assert cuda.gpu_present() is True


@pytest.mark.parametrize("gpus", [0, 1])
def test_import_tensorrt_names_what_is_missing(machine, gpus):
    machine(gpus)
    with pytest.raises(DependencyError) as e:
        import_tensorrt()
    if gpus:
        assert "TensorRT is not installed" in str(e.value) and "pip install 'clipdeploy[tensorrt]'" in str(e.value)
    else:
        assert "this machine has no NVIDIA GPU" in str(e.value), e.value
        assert "TensorRT is not installed" not in str(e.value) and "pip install" not in str(e.value), e.value


@pytest.mark.parametrize("gpus", [0, 1])
def test_build_error_and_run_skip_reason(machine, gpus, tiny_artifact, capsys):
    machine(gpus)
    assert main(["build", str(tiny_artifact), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    with pytest.raises(stages.Unavailable) as skip:  # what `clipdeploy run` prints beside a skipped build/validate
        stages.tensorrt_target(0)
    for text in (err, str(skip.value)):
        if gpus:
            assert "TensorRT is not installed" in text, text
        else:
            assert "no NVIDIA GPU" in text and "install" not in text.lower(), text
