"""The one place tool versions are read: the export's manifest, the bench report and the pipeline fingerprint."""

from __future__ import annotations

from importlib import metadata

import pytest

from clipdeploy.artifact import tool_versions


@pytest.fixture
def only_gpu_onnxruntime(monkeypatch):
    table = {"onnxruntime-gpu": "1.99.0", "numpy": "2.0.0"}

    def version(name: str) -> str:
        if name not in table:
            raise metadata.PackageNotFoundError(name)
        return table[name]

    monkeypatch.setattr(tool_versions.metadata, "version", version)


def test_the_gpu_build_counts_as_onnxruntime(only_gpu_onnxruntime):
    assert tool_versions.installed("onnxruntime") == "1.99.0"
    assert tool_versions.installed("torch") is None


def test_versions_keep_absent_ones_and_found_versions_drop_them(only_gpu_onnxruntime):
    assert tool_versions.versions("numpy", "torch") == {"numpy": "2.0.0", "torch": None}
    found = tool_versions.found_versions("numpy", "torch")
    assert set(found) == {"python", "numpy"} and found["numpy"] == "2.0.0"
