"""The precision stage's graph edits, on onnx_ir, with unnamed nodes (ONNX leaves names optional)."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_ir")
from onnx import TensorProto, helper  # noqa: E402

from clipdeploy.quantize import graph  # noqa: E402


def _round_trip_model(output_chain: bool):
    """x → Relu → Cast(fp16) → Cast(fp32) → Relu → y, every node unnamed; with ``output_chain`` the
    fp16 value also leaves the graph through its own Cast(fp32) as ``z``."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Cast", ["r"], ["h"], to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["h"], ["r2"], to=TensorProto.FLOAT),
        helper.make_node("Relu", ["r2"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])]
    if output_chain:
        nodes.append(helper.make_node("Cast", ["h"], ["z"], to=TensorProto.FLOAT))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])], outputs,
                          value_info=[helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 3])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


@pytest.mark.parametrize("output_chain", [False, True])
def test_fp16_round_trips_go_between_unnamed_nodes(output_chain):
    proto = _round_trip_model(output_chain)
    x = np.array([[1e5, -1.0, 0.5], [70000.0, 2.0, 3.0]], np.float32)  # past fp16's 65504
    edited = graph.to_ir(proto)
    removed = graph.drop_fp16_round_trips(edited)
    edited.graph.sort()
    out = graph.to_proto(edited)
    onnx.checker.check_model(out, full_check=True)
    ops = [(n.op_type, list(n.input)) for n in out.graph.node]
    # The Relu reads the fp32 value itself; the fp16 Cast stays only where a graph output needs it.
    assert ("Relu", ["r"]) in ops
    assert removed == (1 if output_chain else 2)
    assert [op for op, _ in ops].count("Cast") == (2 if output_chain else 0)
    assert [vi.name for vi in out.graph.value_info] == ["r"]  # the records go back as they came
    y = _run(out, x)[0]
    np.testing.assert_array_equal(y, np.maximum(x, 0))  # no overflow to inf on the way
    assert np.isinf(_run(proto, x)[0]).any()  # which the round trip did cause


def test_fits_and_to_ir_keep_an_unnamed_graph_whole():
    proto = _round_trip_model(True)
    assert graph.fits(proto)
    back = graph.to_proto(graph.to_ir(proto))
    assert [(n.op_type, list(n.input), list(n.output), n.name) for n in back.graph.node] == [
        (n.op_type, list(n.input), list(n.output), n.name) for n in proto.graph.node
    ]
