"""Fixtures for the pipeline tests; the helpers live in tests/support/pipeline_fakes.py."""

from __future__ import annotations

import pytest
from tests.support.pipeline_fakes import FakeStages

from clipdeploy.pipeline import stages
from clipdeploy.pipeline.stages import Unavailable


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeStages:
    """Stage work replaced by FakeStages; build and validate see no TensorRT unless a test gives them a GPU."""
    f = FakeStages()
    for name in ("export", "quantize", "build", "validate", "bench"):
        monkeypatch.setattr(stages.STAGES[name], "run", getattr(f, name))

    def no_tensorrt(device: int) -> dict:
        raise Unavailable(
            "TensorRT is not installed or does not load (test); install it with pip install 'clipdeploy[tensorrt]'"
        )

    monkeypatch.setattr(stages, "tensorrt_target", no_tensorrt)
    monkeypatch.setattr(stages, "_machine", lambda device: {"cpu": "test cpu", "cores": 2, "device": "cpu", "gpus": []})
    return f
