"""fp8 Q/DQ placement on a small hand-made graph (no torch, seconds): a float8 tensor feeds only its
DequantizeLinear, every MatMul/Gemm/Conv reads DequantizeLinear outputs, ONNX Runtime's CPU provider
loads the graph at its full optimization level (the ConvNeXt failure was a float8 Transpose input),
and the result stays within fp8 rounding of fp32."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ml_dtypes")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from clipdeploy.quantize import fp8  # noqa: E402

FLOAT8 = TensorProto.FLOAT8E4M3FN


def _model() -> onnx.ModelProto:
    """pixels -> Conv (stem) -> Conv -> Transpose -> MatMul(weight) -> Gemm(transB) -> Transpose -> MatMul(act x act)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(8, 3, 2, 2)).astype(np.float32), "stem_w"),
        numpy_helper.from_array(rng.normal(size=(8, 8, 1, 1)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32), "mm_w"),
        numpy_helper.from_array(rng.normal(size=(12, 16)).astype(np.float32), "gemm_w"),
    ]
    nodes = [
        helper.make_node("Conv", ["pixels", "stem_w"], ["stem"], name="stem", strides=[2, 2]),
        helper.make_node("Conv", ["stem", "conv_w"], ["conv"], name="conv"),
        helper.make_node("Transpose", ["conv"], ["nhwc"], name="permute", perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["nhwc", "mm_w"], ["mm"], name="mm"),
        helper.make_node("Reshape", ["mm", "flat2"], ["rows"], name="rows"),
        helper.make_node("Gemm", ["rows", "gemm_w"], ["gemm"], name="gemm", transB=1),
        helper.make_node("Transpose", ["gemm"], ["gemm_t"], name="t", perm=[1, 0]),
        helper.make_node("MatMul", ["gemm", "gemm_t"], ["out"], name="bmm"),
    ]
    inits.append(numpy_helper.from_array(np.array([-1, 16], np.int64), "flat2"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


def _run(model: onnx.ModelProto, x: np.ndarray, tensors: list[str] = ()) -> dict[str, np.ndarray]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in tensors:
        m.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {"pixels": x}), strict=True))


def test_fp8_qdq_sits_only_before_matmul_gemm_conv_and_runs_on_onnxruntime_cpu():
    model = _model()
    x = np.random.default_rng(1).normal(size=(1, 3, 4, 4)).astype(np.float32)
    ref = _run(model, x, ["stem", "conv", "nhwc", "rows", "gemm", "gemm_t"])
    ranges = {k: (float(v.min()), float(v.max())) for k, v in ref.items()}
    stem = fp8.patch_embedding(model)
    assert stem == ["stem"]
    q, counts = fp8.insert_qdq(model, ranges, stem)
    onnx.checker.check_model(q, full_check=True)
    assert counts["left_unquantized"]["excluded"] == ["stem"]
    assert counts["fp8_weights"] == 3 and counts["nodes_quantized"] == 4
    assert counts["activation_qdq"] == 5  # the inputs of conv, mm and gemm, and both of bmm's
    inits = {i.name: i for i in q.graph.initializer}
    assert not {"conv_w", "mm_w", "gemm_w"} & set(inits), "weights are stored in fp8 only"
    producers = {o: n for n in q.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in q.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in q.graph.node:
        if n.op_type == "QuantizeLinear":  # its float8 output feeds DequantizeLinear and nothing else
            assert [c.op_type for c in consumers[n.output[0]]] == ["DequantizeLinear"], n.name
        if n.op_type == "DequantizeLinear":
            assert inits[n.input[2]].data_type == FLOAT8
            if n.input[0] in inits:
                assert inits[n.input[0]].data_type == FLOAT8 and inits[n.input[1]].dims  # per-channel
            else:
                assert producers[n.input[0]].op_type == "QuantizeLinear"
            assert {c.op_type for c in consumers[n.output[0]]} <= {"MatMul", "Gemm", "Conv"}
        if n.op_type in ("MatMul", "Gemm", "Conv") and n.name != "stem":
            assert all(producers[i].op_type == "DequantizeLinear" for i in n.input[:2]), n.name
    stem_node = next(n for n in q.graph.node if n.name == "stem")
    assert stem_node.input[0] == "pixels" and stem_node.input[1] in inits  # left in full precision
    gemm_dq = producers[next(n for n in q.graph.node if n.name == "gemm").input[1]]
    assert next(a.i for a in gemm_dq.attribute if a.name == "axis") == 0  # transB: output channels on axis 0
    got = _run(q, x)["out"]
    want = ref["out"]
    cos = float(np.sum(got * want) / np.linalg.norm(got) / np.linalg.norm(want))
    assert 0.99 < cos < 1.0 - 1e-7, cos  # fp8 rounding changed the values, but not by much


def test_fp8_leaves_a_node_without_a_calibrated_range_unquantized():
    model = _model()
    q, counts = fp8.insert_qdq(model, {}, [])
    assert counts["nodes_quantized"] == 0 and len(counts["left_unquantized"]["no_range"]) == 5
    assert not [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
