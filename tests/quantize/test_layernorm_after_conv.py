"""TensorRT's int8 placement for a LayerNorm that reads a Conv output (ConvNeXt's Conv → Transpose →
LayerNorm): a symmetric Q/DQ on its input, scaled by the Conv output's calibrated range, with gamma
and beta left in float; a LayerNorm fed by anything else stays unquantized."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from clipdeploy.quantize import graph, int8  # noqa: E402
from clipdeploy.quantize.config import METHODS  # noqa: E402
from clipdeploy.validation import cosine_rows  # noqa: E402


C = 64  # channels: large enough that weights go to a side file when external data is asked for


def _model(path, named=True):
    """x → Conv → Transpose → LN_conv → MatMul → LN_matmul → y, with seeded weights."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(C, 4, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(size=C).astype(np.float32), "conv_b"),
        numpy_helper.from_array((1 + 0.1 * rng.normal(size=C)).astype(np.float32), "g1"),
        numpy_helper.from_array((0.1 * rng.normal(size=C)).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.normal(size=(C, C)) / 8).astype(np.float32), "mm_w"),
        numpy_helper.from_array(np.ones(C, np.float32), "g2"),
        numpy_helper.from_array(np.zeros(C, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["conv_out"], ["nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("LayerNormalization", ["nhwc", "g1", "b1"], ["ln1"], name="ln_conv", axis=-1),
        helper.make_node("MatMul", ["ln1", "mm_w"], ["mm"], name="matmul"),
        helper.make_node("LayerNormalization", ["mm", "g2", "b2"], ["y"], name="ln_matmul", axis=-1),
    ]
    if not named:
        for n in nodes:
            n.name = ""
    g = helper.make_graph(
        nodes, "convnext_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 8, C])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _feeds(n: int = 16):
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(2, 4, 8, 8)).astype(np.float32)} for _ in range(n)]


def _quantized(tmp_path, exclude=(), method="minmax", named=True):
    src = _model(tmp_path / "m.onnx", named=named)
    prepared = tmp_path / "m.prepared.onnx"
    int8.prepare(src, prepared)
    dst = tmp_path / "m.int8.onnx"
    done = int8.quantize(prepared, dst, _feeds(), method=method, cache=tmp_path / "cache.json", exclude=exclude)
    model = graph.load(dst)
    return src, dst, model, done


def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


@pytest.mark.parametrize("method", METHODS)
def test_layernorm_after_conv_gets_input_qdq_scaled_by_the_conv_range(tmp_path, method):
    src, dst, model, done = _quantized(tmp_path, method=method)
    assert done == ["ln_conv"]
    producers = _producers(model)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}

    dq = producers[nodes["ln_conv"].input[0]]
    assert dq.op_type == "DequantizeLinear"
    q = producers[dq.input[0]]
    assert q.op_type == "QuantizeLinear" and producers[q.input[0]].op_type == "Transpose"
    assert inits[q.input[2]].dtype == np.int8 and inits[q.input[2]] == 0, "symmetric int8, zero-point 0"
    # The scale is the Conv output's max |value| over the calibration feeds / 127, measured here
    # independently on the fp32 model.
    fp32 = onnx.load(str(src))
    fp32.graph.output.append(helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, None))
    sess = ort.InferenceSession(fp32.SerializeToString(), providers=["CPUExecutionProvider"])
    amax = max(float(np.abs(sess.run(["conv_out"], f)[0]).max()) for f in _feeds())
    if method == "minmax":
        assert float(inits[q.input[1]]) == pytest.approx(amax / 127.0, rel=1e-5)
    else:  # entropy and percentile clip the range: a positive scale no wider than the observed one
        assert 0 < float(inits[q.input[1]]) <= amax / 127.0 * (1 + 1e-5)
    # gamma and beta stay float initializers; the LayerNorm's own output gets no Q/DQ of its own
    # (the one after it belongs to the MatMul's input).
    assert all(name in inits and inits[name].dtype == np.float32 for name in nodes["ln_conv"].input[1:])
    assert producers[nodes["ln_matmul"].input[0]].op_type == "MatMul", "a LayerNorm after a MatMul stays unquantized"

    onnx.checker.check_model(str(dst), full_check=True)
    feed = _feeds(1)[0]
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert cosine_rows(got.reshape(-1, C), ref.reshape(-1, C)).min() > 0.95


def test_layernorm_stays_float_when_recovery_keeps_its_conv(tmp_path):
    _, _, model, done = _quantized(tmp_path, exclude=["conv"])
    assert done == []
    ln = next(n for n in model.graph.node if n.name == "ln_conv")
    assert _producers(model)[ln.input[0]].op_type == "Transpose"


def _int8_fp16(tmp_path, qdq):
    """The int8-fp16 variant of ``qdq`` as the stage makes it (fp16 pass, then the fold), checked."""
    from clipdeploy.quantize import fp16

    tmp = tmp_path / "m.fp16pass.onnx"
    fp16.convert(qdq, tmp, _feeds(4), keep_fp32_ops=fp16.ALWAYS_FP32_OPS + ("QuantizeLinear", "DequantizeLinear"))
    model = int8.fold_qdq_into_fp16(graph.load(tmp))
    out = tmp_path / "m.int8-fp16.onnx"
    graph.save(model, out)
    graph.check(out)
    return model, out


def test_int8_fp16_folds_the_layernorm_qdq(tmp_path):
    """int8-fp16: the LayerNorm's Q/DQ takes an fp16 scale like the others and the graph still checks."""
    _, qdq, _, _ = _quantized(tmp_path)
    model, out = _int8_fp16(tmp_path, qdq)
    producers = _producers(model)
    ln = next(n for n in model.graph.node if n.name == "ln_conv")
    cast = producers[ln.input[0]]  # the fp16 DequantizeLinear output, cast up for the fp32 LayerNorm
    dq = producers[cast.input[0]] if cast.op_type == "Cast" else cast
    assert dq.op_type == "DequantizeLinear"
    inits = {i.name: i for i in model.graph.initializer}
    assert inits[dq.input[1]].data_type == TensorProto.FLOAT16
    feed = _feeds(1)[0]
    ref = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert np.isfinite(y).all()
    assert cosine_rows(y.reshape(-1, C).astype(np.float32), ref.reshape(-1, C)).min() > 0.95


def test_unnamed_nodes_get_the_pair_on_the_layernorm_input(tmp_path):
    """Node names are optional in ONNX: the pair must still land on the LayerNorm, not elsewhere."""
    _, _, model, done = _quantized(tmp_path, named=False)
    assert done == ["ln1"]  # identified by its output
    producers = _producers(model)
    ln = next(n for n in model.graph.node if n.op_type == "LayerNormalization" and n.output[0] == "ln1")
    dq = producers[ln.input[0]]
    assert dq.op_type == "DequantizeLinear" and producers[producers[dq.input[0]].input[0]].op_type == "Transpose"
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert producers[conv.input[0]].op_type == "DequantizeLinear"  # its own input pair, from ORT
    assert sum(n.op_type == "QuantizeLinear" and n.output[0].startswith("ln1_ln_input") for n in model.graph.node) == 1


def test_external_data_is_not_written_twice(tmp_path, monkeypatch):
    """A tower over the protobuf limit keeps its weights in a side file; adding the LayerNorm pair
    rewrites the model, and the side file must hold each weight once (onnx appends otherwise)."""
    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 100)
    _, dst, model, done = _quantized(tmp_path)
    assert done == ["ln_conv"]
    side = dst.with_name(dst.name + ".data")
    assert side.is_file()
    stored = sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer)
    assert side.stat().st_size <= stored + 4096  # alignment padding at most, never a second copy


def test_recovery_ranks_named_nodes_only_when_some_are_unnamed(tmp_path):
    """Recovery keeps nodes in fp32 by name: an unnamed Conv cannot be kept, and must not take the
    place of another unnamed node under the shared empty name (which once scored the wrong node)."""
    from clipdeploy.quantize import recovery

    src = _model(tmp_path / "m.onnx", named=False)
    model = onnx.load(str(src))
    model.graph.node[3].name = "matmul"  # the MatMul only; Conv and both LayerNorms stay unnamed
    onnx.save(model, str(src))
    prepared = tmp_path / "m.prepared.onnx"
    int8.prepare(src, prepared)
    qdq = tmp_path / "m.int8.onnx"
    int8.quantize(prepared, qdq, _feeds(), method="minmax", cache=tmp_path / "cache.json")
    singles = [{"x": f["x"][i : i + 1]} for f in _feeds(4) for i in range(2)]
    ranked = recovery.rank_nodes(qdq, prepared, singles)
    assert [name for name, _ in ranked] == ["matmul"]
    assert 0 < ranked[0][1] < 0.5  # the MatMul's own int8 error: small but not zero


def test_int8_fp16_with_unnamed_nodes(tmp_path):
    """The fold edits by value links, not names: an unnamed graph folds like a named one."""
    _, qdq, _, done = _quantized(tmp_path, named=False)
    assert done == ["ln1"]
    model, out = _int8_fp16(tmp_path, qdq)
    inits = {i.name: i for i in model.graph.initializer}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]  # x, conv_w, mm_w, ln1 and the LN pair
    assert len(dqs) == 5 and all(inits[n.input[1]].data_type == TensorProto.FLOAT16 for n in dqs)
    # Every unnamed MatMul/Conv reads its DequantizeLinear directly (no Cast between).
    producers = _producers(model)
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Conv"):
            assert not n.name and producers[n.input[0]].op_type == "DequantizeLinear"
    feed = _feeds(1)[0]
    ref = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert cosine_rows(y.reshape(-1, C).astype(np.float32), ref.reshape(-1, C)).min() > 0.95
