"""The test suite's own layout: helpers import as ``tests.support`` / ``tests.<folder>`` modules, so
collection works in every pytest import mode, and the micro-model registry matches what it describes."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.models import MODELS, by_kind

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
STUBS = TESTS / "triton" / "stub"  # stand-ins for modules Triton provides by their bare names


def _test_sources() -> list[Path]:
    return [p for p in sorted(TESTS.rglob("*.py")) if STUBS not in p.parents]


def test_no_test_helper_is_imported_as_a_bare_top_level_module():
    """`from testdata import ...` works only while pytest prepends each test folder to sys.path."""
    local = {p.stem for p in _test_sources()} - {"__init__", "conftest"}
    bare = []
    for path in _test_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            bare += [f"{path.relative_to(REPO)}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in local]
    assert bare == [], "import test helpers qualified (from tests.support.x import ...):\n" + "\n".join(bare)


def test_every_test_folder_is_a_package():
    folders = {p.parent for p in TESTS.rglob("test_*.py")} | {TESTS / "support"}
    assert sorted(str(f.relative_to(REPO)) for f in folders if not (f / "__init__.py").is_file()) == []


def test_collection_works_in_importlib_mode():
    """A few files whose helpers and conftests span folders, collected the way CI runs pytest but with
    ``--import-mode=importlib``, which puts no test folder on sys.path (this run covers the default mode)."""
    files = ["tests/engines/test_build_leftovers.py", "tests/pipeline/test_config.py",
             "tests/benchmarks/test_bench_report.py", "tests/export/test_external_data.py"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "--import-mode=importlib",
         *files], cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    collected = {line.split("::")[0] for line in result.stdout.splitlines() if "::" in line}
    assert collected == set(files), result.stdout[-3000:]


def test_registry_configs_match_their_figures(tmp_path):
    assert len(by_kind("open_clip")) >= 5 and by_kind("onnx") == [MODELS["tiny-onnx"]]
    for model in by_kind("open_clip"):
        config = model.model_config()
        assert json.loads(model.config_file(tmp_path).read_text()) == config, model.name
        assert config["embed_dim"] == model.expected["embed_dim"], model.name
        assert config["vision_cfg"]["image_size"] == model.expected["image_size"], model.name
        if "context_length" in model.expected:
            assert config["text_cfg"]["context_length"] == model.expected["context_length"], model.name
        assert model.purpose, model.name


def test_tiny_onnx_manifest_matches_the_registry(tiny_template_for_registry):
    model = MODELS["tiny-onnx"]
    manifest = json.loads((tiny_template_for_registry / "manifest.json").read_text())
    assert manifest["model"]["family"] == model.expected["family"]
    assert manifest["model"]["embed_dim"] == model.expected["embed_dim"]
    with pytest.raises(ValueError, match="tiny-onnx"):
        model.model_config()


@pytest.fixture
def tiny_template_for_registry(tmp_path: Path) -> Path:
    pytest.importorskip("onnx")
    return MODELS["tiny-onnx"].make(tmp_path / "artifact")


def test_micro_vit_export_matches_the_registry(micro_artifact):
    model = MODELS["micro-vit"]
    manifest = json.loads((micro_artifact.path / "manifest.json").read_text())
    assert manifest["model"]["name"] == model.name
    assert manifest["model"]["family"] == model.expected["family"]
    assert manifest["model"]["embed_dim"] == model.expected["embed_dim"]
