"""The ONNX Runtime backend's int8 path: ``session.x64quantprecision=1`` (the exact U8U8 kernels) is set on
CPUs without VNNI only, describe() says which int8 kernels run, and the int8 result is exact on this CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", reason="the onnxruntime backend needs pip install 'clipdeploy[cpu]'")
onnx = pytest.importorskip("onnx", reason="the test graphs are written with onnx")

import clipdeploy  # noqa: E402
from clipdeploy import cpu_features  # noqa: E402
from clipdeploy.runtime.backends.onnxruntime import X64_QUANT_PRECISION, OrtOptions, OrtRunner  # noqa: E402

from tests.support.cpus import CPUS, VNNI_CPUS, use_cpu  # noqa: E402
from tests.support.models import MODELS  # noqa: E402


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory) -> Path:
    try:
        return MODELS["tiny-onnx"].make(tmp_path_factory.mktemp("ort-int8") / "artifact", precisions=("fp32", "int8"))
    except FileNotFoundError as e:
        pytest.skip(f"the tiny artifact needs {e}")


def _flag(runner: OrtRunner) -> str | None:
    try:
        return runner.session.get_session_options().get_session_config_entry(X64_QUANT_PRECISION)
    except RuntimeError:  # ONNX Runtime: "SessionOptions does not have configuration with key ..."
        return None


@pytest.mark.parametrize("kind", sorted(CPUS))
def test_exact_u8u8_is_set_only_without_vnni_and_describe_says_which(tiny_int8, monkeypatch, tmp_path, kind):
    use_cpu(monkeypatch, tmp_path, kind)
    vnni = kind in VNNI_CPUS
    assert cpu_features.has_vnni() is vnni
    session = clipdeploy.load(tiny_int8, backend="onnxruntime", precision="int8")
    for tower, runner in session.runners.items():
        assert _flag(runner) == (None if vnni else "1"), (kind, tower)
        assert runner.exact_int8 is (not vnni)
    described = session.describe()
    if vnni:
        assert "int8 onnx on onnxruntime (CPUExecutionProvider, VNNI int8 kernels)" in described, described
        assert "x64quantprecision" not in described
    else:
        assert f"int8 onnx on onnxruntime (CPUExecutionProvider, exact U8U8 int8 ({X64_QUANT_PRECISION}=1: no VNNI))" \
            in described, described
    fp32 = clipdeploy.load(tiny_int8, backend="onnxruntime", precision="fp32").describe()
    assert "fp32 onnx on onnxruntime (CPUExecutionProvider)" in fp32 and "int8" not in fp32.split("[")[0], fp32


def _int8_matmul(path: Path, k: int = 64, n: int = 8) -> np.ndarray:
    """x -> Q/DQ (int8, zero point 0) -> MatMul with DQ'd int8 weights of +-127: as clipdeploy's int8 files
    quantize MatMul inputs. Returns the weights. Pair sums of these reach 2 * 255 * 127, past int16."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.where(np.random.default_rng(0).random((k, n)) < 0.5, 127, -127).astype(np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    init = [
        numpy_helper.from_array(np.array(1 / 127, np.float32), "xs"),
        numpy_helper.from_array(np.array(0, np.int8), "xz"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.full(n, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(n, np.int8), "wz"),
    ]
    graph = helper.make_graph(
        nodes, "int8-matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])], init,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), path)
    return w


def test_int8_matmul_is_exact_on_this_cpu(tmp_path):
    """Whichever path this CPU gets (VNNI kernels, or exact U8U8 without VNNI), int8 MatMul with large
    activations and weights equals integer arithmetic: the U8S8 saturation the flag avoids would not."""
    w = _int8_matmul(tmp_path / "q.onnx")
    runner = OrtRunner(tmp_path / "q.onnx", OrtOptions(), int8=True)
    assert runner.exact_int8 is (not cpu_features.has_vnni())
    x = np.sign(w.T[:4]).astype(np.float32)  # each row lines up with a column's signs: the largest sums
    want = (np.round(x * 127) / 127) @ (w.astype(np.float32) * 0.01)
    got = runner.infer({"x": x})["y"]
    err = float(np.abs(got - want).max())
    assert err < 1e-3, f"int8 MatMul off by {err} (expected {want[0, 0]:.3f}, got {got[0, 0]:.3f})"
