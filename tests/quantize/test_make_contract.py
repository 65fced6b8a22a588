"""The make-step contract (quantize/make.py) and what the precision registry derives for `quantize`:
every built-in step takes one MakeRequest, the request hands out calibration data only, a precision that
runs another's file writes nothing, and `--precision`'s help is the registry's."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import numpy as np
import pytest

from clipdeploy import precisions
from clipdeploy.cli import build_parser
from clipdeploy.quantize.config import QuantizeConfig
from clipdeploy.quantize.make import CALIB_BATCH, MadeVariant, MakeRequest, runs_file


def _request(tmp_path: Path, precision: str = "int8", n: int = 20, **kw) -> MakeRequest:
    defaults = dict(
        tower="image", source=tmp_path / "image.fp32.onnx", source_sha256="0" * 64, out=tmp_path / "w" / "out.onnx",
        work=tmp_path / "w", artifact=tmp_path, cfg=QuantizeConfig(artifact=tmp_path, precision=precision),
        calibration=np.arange(n, dtype=np.float32).reshape(n, 1), input_name="pixels", fingerprint="f",
    )
    return MakeRequest(**{**defaults, **kw})


@pytest.mark.parametrize("name", precisions.quantized())
def test_every_builtin_make_step_takes_one_request(name):
    step = precisions.get(name).make_step()
    (param,) = inspect.signature(step).parameters.values()
    assert param.annotation in (MakeRequest, "MakeRequest"), (name, param)
    assert inspect.signature(step).return_annotation in (MadeVariant, "MadeVariant"), name


def test_feeds_batch_the_calibration_samples_under_the_input_name(tmp_path):
    req = _request(tmp_path, n=20)
    feeds = req.feeds()
    assert [list(f) for f in feeds] == [["pixels"]] * 3
    assert [len(f["pixels"]) for f in feeds] == [CALIB_BATCH, CALIB_BATCH, 20 - 2 * CALIB_BATCH]
    np.testing.assert_array_equal(np.concatenate([f["pixels"] for f in feeds]), req.calibration)
    assert sum(len(f["pixels"]) for f in req.feeds(9)) == 9
    assert req.scratch("qdq") == tmp_path / "w" / "image.qdq.onnx"
    assert _request(tmp_path, suffix=".r3").scratch("fp16pass") == tmp_path / "w" / "image.fp16pass.r3.onnx"


def test_a_precision_that_runs_another_file_writes_nothing_and_names_its_settings(tmp_path):
    req = _request(tmp_path, precision="bf16")
    made = precisions.get("bf16").make_step()(req)
    assert made == MadeVariant({"runs": "image.fp32.onnx", "openvino_inference_precision_hint": "bf16"})
    assert runs_file(req) == made and not req.work.exists()


def _precision_help() -> str:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    (action,) = [a for a in sub.choices["quantize"]._actions if "--precision" in a.option_strings]
    return " ".join(action.help.split())


def test_precision_help_is_the_registry_s_and_follows_it():
    text = _precision_help()
    for name in precisions.quantized():  # fp16 and fp8 included (the hand-written help left them out)
        assert f"{name}: {precisions.get(name).summary}" in text, (name, text)
    precisions.register(precisions.PrecisionSpec("toy-int4", "tests.nowhere:make", summary="four bits, a toy"))
    try:
        assert "toy-int4: four bits, a toy" in _precision_help()
    finally:
        precisions.unregister("toy-int4")
    assert "toy-int4" not in _precision_help()


def test_the_gate_opens_its_runner_through_the_backend_registry(micro_artifact):
    from clipdeploy.errors import UsageError
    from clipdeploy.runtime.backends import registry

    settings = registry.LoadSettings(intra_op_num_threads=1)
    runner = registry.open_file("onnxruntime", micro_artifact.path / "image.fp32.onnx", "fp32", settings)
    assert runner.describe() == "onnxruntime (CPUExecutionProvider)" and runner.inputs[0].name
    with pytest.raises(UsageError, match="backend 'tensorrt' cannot run a lone ONNX file; gate on one of onnxruntime"):
        registry.open_file("tensorrt", micro_artifact.path / "image.fp32.onnx", "fp32", settings)
