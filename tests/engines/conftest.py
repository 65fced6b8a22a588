"""Fixtures for the build stage: a tiny torch-free artifact. The TensorRT bindings come from tests/support/trt_bindings.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tests.support.models import MODELS
from tests.support.trt_bindings import unavailable


@pytest.fixture(scope="session")
def tiny_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-tower artifact of tiny ONNX graphs (dynamic batch and sequence axes), made without torch."""
    pytest.importorskip("onnx")
    try:
        return MODELS["tiny-onnx"].make(tmp_path_factory.mktemp("tiny") / "artifact")
    except FileNotFoundError as e:
        unavailable(f"the tiny artifact needs {e}")
        raise


@pytest.fixture
def tiny_artifact(tiny_template: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny artifact, free to modify."""
    return Path(shutil.copytree(tiny_template, tmp_path / "artifact"))
