"""A manifest's keys are checked on read: a wrong type, a null, a missing key or an out-of-range value is
one ArtifactError line naming the key, from load(), `inspect` and `embed` alike, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import clipdeploy
from clipdeploy.cli import main
from clipdeploy.errors import ArtifactError
from clipdeploy.artifact.manifest import read_manifest
from clipdeploy.artifact.schema import SchemaError, check_schema


def _set(path: str, value: Any):
    """A change that sets (or with value=KeyError, deletes) a dotted key path; [n] indexes a list."""

    def change(m: dict[str, Any]) -> None:
        *parents, last = path.replace("[", ".[").split(".")
        node: Any = m
        for p in parents:
            node = node[int(p[1:-1])] if p.startswith("[") else node[p]
        last_key: Any = int(last[1:-1]) if last.startswith("[") else last
        if value is KeyError:
            del node[last_key]
        else:
            node[last_key] = value

    return change


# (key path to change, new value, key path the error must name)
CORRUPTIONS = [
    ("model.logit_scale", "abc", "model.logit_scale"),
    ("towers", None, "towers"),
    ("towers.image.embed_dim", "abc", "towers.image.embed_dim"),
    ("model.name", KeyError, "model.name"),
    ("model.embed_dim", -3, "model.embed_dim"),
    ("model.embed_dim", True, "model.embed_dim"),
    ("model.logit_bias", "0.5", "model.logit_bias"),
    ("model.checkpoint_sha256", 12, "model.checkpoint_sha256"),
    ("model", None, "model"),
    ("variants[0].precision", "int4", "variants[0].precision"),
    ("variants[1].tower", "audio", "variants[1].tower"),
    ("variants[0].format", "tflite", "variants[0].format"),
    ("variants[0].sha256", 123, "variants[0].sha256"),
    ("variants[0].file", None, "variants[0].file"),
    ("variants[0].bytes", "1 MB", "variants[0].bytes"),
    ("variants[0].external_data", "image.data", "variants[0].external_data"),
    ("variants[0].validation.min_cosine", "high", "variants[0].validation.min_cosine"),
    ("variants[0].validation.passed", "yes", "variants[0].validation.passed"),
    ("variants", None, "variants"),
    ("towers.image.inputs", [], "towers.image.inputs"),
    ("towers.image.inputs[0].shape", "batch,3,64,64", "towers.image.inputs[0].shape"),
    ("towers.image.inputs[0].shape", ["batch", 3, -64, 64], "towers.image.inputs[0].shape[2]"),
    ("towers.image.outputs", KeyError, "towers.image.outputs"),
    ("towers.text.padding", "sideways", "towers.text.padding"),
    ("towers.text.context_length", 0, "towers.text.context_length"),
    ("towers.gpu", {"inputs": [], "outputs": []}, "towers.gpu"),
    ("preprocess.size", [0, 64], "preprocess.size"),
    ("preprocess.mean", None, "preprocess.mean"),
    ("preprocess.std", [0.2, 0.2], "preprocess.std"),
    ("preprocess.interpolation", 3, "preprocess.interpolation"),
    ("preprocess", "bicubic", "preprocess"),
    ("tokenizer.kind", KeyError, "tokenizer.kind"),
    ("tokenizer.context_length", "77", "tokenizer.context_length"),
    ("tokenizer.files", None, "tokenizer.files"),
    ("tokenizer.files.bpe_vocab", 7, "tokenizer.files.bpe_vocab"),
    ("files", ["tokenizer/bpe_simple_vocab_16e6.txt.gz"], "files"),
    ("files.tokenizer/bpe_simple_vocab_16e6.txt.gz", 123, "files.tokenizer/bpe_simple_vocab_16e6.txt.gz"),
    ("tools", "clipdeploy 0.1.0", "tools"),
    ("validation.export.images", None, "validation.export.images"),
    ("validation.export.preprocess.max_abs_diff", "0", "validation.export.preprocess.max_abs_diff"),
]
IDS = [f"{path}={value!r}"[:60] for path, value, _ in CORRUPTIONS]


@pytest.fixture(scope="module")
def pristine(micro_artifact) -> dict[str, Any]:
    return json.loads((micro_artifact.path / "manifest.json").read_text())


@pytest.fixture
def artifact(micro_artifact, tmp_path) -> Path:
    return Path(shutil.copytree(micro_artifact.path, tmp_path / "art"))


def _write(root: Path, pristine: dict[str, Any], change) -> None:
    m = json.loads(json.dumps(pristine))
    # The micro artifact writes no dotted keys except the tokenizer file name, set by hand for that case.
    change(m)
    (root / "manifest.json").write_text(json.dumps(m))


def _change(path: str, value: Any):
    if path.startswith("files.tokenizer/"):
        rel = path[len("files.") :]
        return lambda m: m["files"].__setitem__(rel, value)
    return _set(path, value)


@pytest.mark.parametrize("path, value, key", CORRUPTIONS, ids=IDS)
def test_load_names_the_key(path, value, key, artifact, pristine):
    _write(artifact, pristine, _change(path, value))
    with pytest.raises(ArtifactError) as err:
        clipdeploy.load(artifact)
    msg = str(err.value)
    assert f": {key}: " in msg and "re-export" in msg and "\n" not in msg, msg


@pytest.mark.parametrize("path, value, key", CORRUPTIONS, ids=IDS)
def test_inspect_and_embed_exit_2_without_traceback(path, value, key, artifact, pristine, capsys):
    _write(artifact, pristine, _change(path, value))
    for argv in (["inspect", str(artifact)], ["inspect", "--json", str(artifact)], ["embed", str(artifact), "--text", "a"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("clipdeploy: error:") and f": {key}: " in err and "\n" not in err, err


def test_error_says_what_it_got(artifact, pristine):
    _write(artifact, pristine, _set("towers.image.embed_dim", "abc"))
    with pytest.raises(ArtifactError, match=r"towers\.image\.embed_dim: expected an integer, got 'abc'"):
        read_manifest(artifact)
    _write(artifact, pristine, _set("towers.image.embed_dim", 0))
    with pytest.raises(ArtifactError, match=r"towers\.image\.embed_dim: expected an integer of 1 or more, got 0"):
        read_manifest(artifact)
    _write(artifact, pristine, _set("model.name", KeyError))
    with pytest.raises(ArtifactError, match=r"model\.name: missing"):
        read_manifest(artifact)


def test_exported_manifest_and_test_fixtures_validate(pristine, micro_artifact):
    check_schema(pristine)
    session = clipdeploy.load(micro_artifact.path)  # and it still loads and embeds
    assert session.encode_text(["a cat"]).shape == (1, 64)


def test_unknown_keys_are_left_alone(artifact, pristine):
    # A later minor version may add keys: they pass, and known keys are still checked.
    _write(artifact, pristine, lambda m: m.update(future={"anything": [1, None]}) or m["model"].update(extra="x"))
    assert read_manifest(artifact)["future"] == {"anything": [1, None]}


def test_failed_gate_with_nan_figures_stays_readable(pristine):
    m = json.loads(json.dumps(pristine))
    m["variants"][0]["validation"].update(min_cosine=float("nan"), passed=False)
    check_schema(m)  # NaN from a broken variant is a figure, not corruption
    m["model"]["logit_scale"] = float("inf")
    with pytest.raises(SchemaError, match="model.logit_scale: expected a finite number"):
        check_schema(m)


def test_inspect_prints_a_manifest_with_only_the_required_keys(artifact, pristine, capsys):
    # What the schema accepts, inspect prints: no key it leaves optional may be needed.
    m = {k: pristine[k] for k in ("schema_version", "preprocess", "tokenizer")}
    m["model"] = {k: pristine["model"][k] for k in ("name", "embed_dim", "logit_scale")}
    m["towers"] = {t: {k: e[k] for k in ("inputs", "outputs")} for t, e in pristine["towers"].items()}
    m["variants"] = [{k: v[k] for k in ("tower", "precision", "format", "file", "sha256")} for v in pristine["variants"]]
    m["variants"][0]["validation"] = None
    m["preprocess"] = {**m["preprocess"], "size": 64}  # an int size is valid (square)
    m["validation"] = {"export": {}}
    (artifact / "manifest.json").write_text(json.dumps(m))
    assert main(["inspect", str(artifact)]) == 0
    out = capsys.readouterr().out
    assert "preprocess 64x64" in out and "FAIL  image.fp32.onnx" in out
