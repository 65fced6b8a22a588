"""`clipdeploy validate --load-results` on CPU: Polygraphy RunResults files compared with ONNX Runtime.

The "engine" here is ONNX Runtime running the engine's own ONNX source through the same code that
runs a TensorRT engine (run_engine) and saves its results (polygraphy_results.save), so the saved
outputs are true ones; perturbed copies must fail, in one line naming the output and the tolerance
that would have passed. That TensorRT writes such a file is the contract and GPU tests' business.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipdeploy.cli import main
from clipdeploy.engines import polygraphy_results as pg
from clipdeploy.engines.validate import run_engine, sample_inputs
from clipdeploy.artifact.view import ArtifactView
from clipdeploy.runtime.backends.onnxruntime import OrtOptions, OrtRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("polygraphy")

PROFILES = {
    "image": {"pixel_values": {"min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [8, 3, 32, 32]}},
    "text": {"input_ids": {"min": [1, 1], "opt": [4, 32], "max": [8, 77]}},
}


def saved_runs(art, precision="fp16"):
    view = ArtifactView.read(art)
    inputs = sample_inputs(view)
    runs = []
    for v in view.variants:
        if v.format != "onnx" or v.precision != precision:
            continue
        runner = OrtRunner(art / v.file, OrtOptions(providers=("CPUExecutionProvider",)))
        feeds, outputs = run_engine(runner, inputs[v.tower], PROFILES[v.tower])
        runs.append(pg.EngineRun(v.tower, precision, v.sha256, f"engines/{v.tower}.{precision}.sm90.plan", feeds, outputs))
    assert {r.tower for r in runs} == {"image", "text"}
    return runs


def validate(art, path, *extra, capsys):
    rc = main(["-q", "validate", str(art), "--load-results", str(path), *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def test_saved_true_results_pass_and_name_polygraphy_figures(tiny_artifact, tmp_path, capsys):
    runs = saved_runs(tiny_artifact)
    assert [len(r.outputs) for r in runs] == [3, 3]  # batch 1, 4 and 8 of the profile
    path = tmp_path / "results.json"
    pg.save(path, runs)
    assert json.loads(path.read_text())["polygraphy_class"] == "RunResults"  # Polygraphy's own format
    rc, out, err = validate(tiny_artifact, path, capsys=capsys)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2 and all(line.endswith(": pass") for line in lines), out
    assert "Polygraphy: image_embeds max abs" in out and "Polygraphy: text_embeds max abs" in out
    assert "at batch 1, 4, 8" in out


def test_perturbed_results_fail_naming_output_and_passing_tolerance(tiny_artifact, tmp_path, capsys):
    runs = saved_runs(tiny_artifact)
    image = next(r for r in runs if r.tower == "image")
    y = image.outputs[-1]["image_embeds"]
    bump = 0.2 * float(np.abs(y).max())
    y[0, 3] += bump
    path = tmp_path / "perturbed.json"
    pg.save(path, runs)
    rc, out, err = validate(tiny_artifact, path, capsys=capsys)
    assert rc == 1, (out, err)
    first = err.splitlines()[0]
    assert "Polygraphy output 'image_embeds' exceeds atol" in first
    got = float(first.split("would pass at atol ")[1].split()[0])
    assert got == pytest.approx(bump, rel=1e-3)  # the tolerance that would have passed is the error put in
    assert "text_embeds" not in first  # the untouched tower passed


def test_polygraphy_tolerance_decides_where_our_gate_passes(tiny_artifact, tmp_path, capsys):
    """A 1e-4 relative error passes fp16's own gates; --atol 1e-9 makes Polygraphy's comparator fail it."""
    runs = saved_runs(tiny_artifact)
    image = next(r for r in runs if r.tower == "image")
    image.outputs[0]["image_embeds"] *= 1 + 1e-4
    path = tmp_path / "small.json"
    pg.save(path, runs)
    assert validate(tiny_artifact, path, capsys=capsys)[0] == 0
    rc, out, err = validate(tiny_artifact, path, "--atol", "image_embeds=1e-9", capsys=capsys)
    assert rc == 1
    assert "Polygraphy output 'image_embeds' exceeds atol 1.000e-09" in err and "min cosine" not in err.splitlines()[0]
    # An rtol above the error lets it pass again: an element fails only when it exceeds both.
    assert validate(tiny_artifact, path, "--atol", "image_embeds=1e-9", "--rtol", "2e-4", capsys=capsys)[0] == 0


def test_results_from_another_onnx_file_are_refused_in_one_line(tiny_artifact, tmp_path, capsys):
    runs = saved_runs(tiny_artifact)
    runs[0].source_sha256 = "0" * 64
    path = tmp_path / "other.json"
    pg.save(path, runs)
    rc, out, err = validate(tiny_artifact, path, capsys=capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "sha256 000000000000" in err and "copy of the artifact the engine was built from" in err


@pytest.mark.parametrize(
    "content, extra, match",
    [
        (None, (), "does not exist"),
        ("{not json", (), "is not a Polygraphy RunResults file"),
        (None, ("--atol", "x=-1"), "--atol 'x=-1'"),
        (None, ("--precision", "fp16"), "drop --save-results and --precision"),
    ],
)
def test_bad_results_files_and_options_are_refused(tiny_artifact, tmp_path, capsys, content, extra, match):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    rc, out, err = validate(tiny_artifact, path, *extra, capsys=capsys)
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1, err
