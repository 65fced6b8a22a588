"""`export --force` over an artifact that holds more than an export writes says, in one line, what goes
with it (variants, TensorRT engines, calibration caches); and it does not swap out an artifact a
quantize is writing into."""

from __future__ import annotations

import json
import logging

import pytest

pytest.importorskip("onnx", reason="the tiny artifact is written with onnx")

from clipdeploy.cli import main  # noqa: E402
from clipdeploy.errors import UsageError  # noqa: E402
from clipdeploy.export import exporter  # noqa: E402
from clipdeploy.artifact.staging import job_lock  # noqa: E402

from tests.support.tiny_artifact import bpe_vocab, make_tiny_artifact  # noqa: E402

if bpe_vocab() is None:
    pytest.skip("the tiny artifact needs open_clip's BPE vocabulary file", allow_module_level=True)


@pytest.fixture
def worked_on(tmp_path):
    """An artifact after quantize and build: fp16 and int8 variants, an engine, calibration caches."""
    art = make_tiny_artifact(tmp_path / "art", ("fp32", "fp16", "int8"))
    manifest = json.loads((art / "manifest.json").read_text())
    (art / "engines").mkdir()
    (art / "engines" / "image.fp16.h100.plan").write_bytes(b"plan")
    manifest["variants"].append({"tower": "image", "precision": "fp16", "format": "tensorrt",
                                 "file": "engines/image.fp16.h100.plan", "sha256": "0" * 64})
    (art / "manifest.json").write_text(json.dumps(manifest))
    (art / "calibration").mkdir()
    for tower in ("image", "text"):
        (art / "calibration" / f"{tower}.minmax.0123456789abcdef0123.json").write_text("{}")
    return art


def _stop_after_checks(monkeypatch):
    """The export itself (torch, minutes) is not what is tested: stop right after the output checks."""

    def stop(cfg, work):
        raise UsageError("stopped after the output checks")

    monkeypatch.setattr(exporter, "_build", stop)


def test_force_says_in_one_line_what_it_replaces(worked_on, monkeypatch, capsys):
    _stop_after_checks(monkeypatch)
    assert main(["export", "micro-vit", "-o", str(worked_on), "--force"]) == 2
    err = capsys.readouterr().err.splitlines()
    said = [ln for ln in err if "--force replaces" in ln]
    assert len(said) == 1, err
    line = said[0]
    assert repr(str(worked_on)) in line
    assert "its fp16, int8 variants" in line
    assert "1 TensorRT engine (engines/image.fp16.h100.plan)" in line
    assert "2 calibration files (calibration/)" in line
    assert (worked_on / "calibration").is_dir()  # said, not done: the export did not pass


def test_force_over_a_plain_export_says_nothing(tmp_path, caplog):
    art = make_tiny_artifact(tmp_path / "art", ("fp32",))
    with caplog.at_level(logging.WARNING, logger="clipdeploy"):
        exporter._check_output(art, force=True)
    assert not [r for r in caplog.records if "--force replaces" in r.getMessage()]
    assert exporter.replaced_work(art) is None


def test_force_refuses_while_a_quantize_runs_on_the_artifact(worked_on):
    with job_lock(worked_on, "quantize-int8", "quantize --precision int8"):
        with pytest.raises(UsageError, match=r"while quantize-int8 \(pid \d+ .*\) runs on it"):
            exporter._check_output(worked_on, force=True)
    exporter._check_output(worked_on, force=True)  # once it is done, --force goes ahead
