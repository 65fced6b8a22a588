"""ONNX graph helpers for the precision stage: load and save (large models too), and observe the
values of intermediate tensors on real inputs."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipdeploy.deps import require

if TYPE_CHECKING:
    import onnx_ir as ir

# Same threshold as the exporter: protobuf cannot hold more than 2 GiB in one message.
EXTERNAL_DATA_THRESHOLD = 1_500_000_000
FLOAT_TYPES = (1, 10)  # onnx.TensorProto.FLOAT, FLOAT16


def load(path: Path) -> Any:
    onnx = require("onnx", "export")

    return onnx.load(str(path), load_external_data=True)


def save(model: Any, path: Path) -> list[Path]:
    """Save ``model``; weights go to ``<name>.data`` when the model is too large for one protobuf.

    Returns the side files written.
    """
    onnx = require("onnx", "export")

    large = model.ByteSize() > EXTERNAL_DATA_THRESHOLD if fits(model) else True
    if large:
        data = path.with_name(path.name + ".data")
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
        return [data]
    onnx.save(model, str(path))
    return []


def fits(model: Any) -> bool:
    """Whether protobuf can serialize ``model`` in one message (under 2 GiB)."""
    try:
        model.ByteSize()
        return True
    except ValueError:  # protobuf refuses to size a message over 2 GiB
        return False


def check(path: Path) -> None:
    """Full ONNX check, type inference included: a variant must be a valid model, not one only
    ONNX Runtime tolerates."""
    onnx = require("onnx", "export")

    onnx.checker.check_model(str(path), full_check=True)


def float_tensors(model: Any) -> dict[str, int]:
    """Every float tensor a node produces, with its element type, from ONNX shape inference."""
    onnx = require("onnx", "export")

    inferred = onnx.shape_inference.infer_shapes(model, data_prop=False) if fits(model) else model
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    types.update({o.name: o.type.tensor_type.elem_type for o in inferred.graph.output})
    produced = {o for n in model.graph.node for o in n.output if o}
    return {name: t for name, t in types.items() if name in produced and t in FLOAT_TYPES}


def observe(model_path: Path, names: Iterable[str], feeds: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """Run the model on each feed and yield the values of ``names`` (intermediate tensors)."""
    onnx = require("onnx", "export")
    ort = require("onnxruntime", "cpu")

    model = load(model_path)
    types = float_tensors(model)
    existing = {o.name for o in model.graph.output}
    wanted = [n for n in names if n not in existing]
    for name in wanted:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, 1), None))
    with tempfile.TemporaryDirectory(prefix="clipdeploy-observe-") as tmp:
        path = Path(tmp) / "observed.onnx"
        save(model, path)
        del model
        so = ort.SessionOptions()
        # Optimizations could fuse away the very tensors being observed.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        out_names = [o.name for o in session.get_outputs()]
        for feed in feeds:
            values = session.run(out_names, feed)
            yield dict(zip(out_names, values, strict=True))


def abs_max(model_path: Path, feeds: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
    """The largest magnitude each float intermediate tensor reaches on ``feeds``."""
    model = load(model_path)
    names = list(float_tensors(model))
    del model
    result: dict[str, float] = {}
    # One sample per run: with every intermediate an output, ONNX Runtime can reuse no buffer, and a
    # batch of 8 through ConvNeXt-B would hold about 17 GB at once.
    singles = (
        {k: v[i : i + 1] for k, v in feed.items()} for feed in feeds for i in range(len(next(iter(feed.values()))))
    )
    for values in observe(model_path, names, singles):
        for name, v in values.items():
            if v.dtype.kind == "f" and v.size:
                result[name] = max(result.get(name, 0.0), float(np.nanmax(np.abs(v))))
    return result


def to_ir(model: Any) -> ir.Model:
    """``model`` (a ModelProto, external data loaded) as an onnx_ir model for editing: values link to
    their producer and their uses, so edits never look nodes up by name (ONNX leaves names optional)."""
    ir = require("onnx_ir", "export")

    _drop_twin_producers(model)
    edited = ir.from_proto(model)
    # The type records go back as they came (see to_proto): copies, so the proto can be freed.
    edited.meta[_VALUE_INFO] = [vi.SerializeToString() for vi in model.graph.value_info]
    return edited


def _drop_twin_producers(model: Any) -> None:
    """Drop a node that repeats an earlier one (same op, inputs and attributes, same output names).

    ONNX Runtime's fp16 converter (1.27 at least) can insert the same Cast twice under one output
    name, which onnx_ir rightly refuses as a redeclared value; the twin computes nothing new. Two
    different nodes naming one output are an invalid model, left for onnx_ir to refuse."""
    producer: dict[str, tuple] = {}
    kept = []
    for node in model.graph.node:
        key = (node.domain, node.op_type, tuple(node.input), tuple(node.output),
               tuple(a.SerializeToString() for a in node.attribute))  # fmt: skip
        if any(o in producer for o in node.output if o) and all(producer.get(o) == key for o in node.output if o):
            continue
        for o in node.output:
            producer.setdefault(o, key)
        kept.append(node)
    if len(kept) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(kept)


def to_proto(model: ir.Model) -> Any:
    """The edited model back as a ModelProto, with the type records it came in with."""
    onnx = require("onnx", "export")
    ir = require("onnx_ir", "export")

    proto = ir.to_proto(model)
    # onnx_ir writes its own records (one per initializer too) and drops those naming no value.
    # ONNX Runtime's fp16 converter places its Casts differently when records change, so the edits
    # (which add no typed values) keep the original records, and the graphs come out as before.
    del proto.graph.value_info[:]
    for data in model.meta.get(_VALUE_INFO, []):
        proto.graph.value_info.add().CopyFrom(onnx.ValueInfoProto.FromString(data))
    return proto


_VALUE_INFO = "clipdeploy.value_info"


def cast_to(node: ir.Node) -> int | None:
    """The element type a Cast converts to."""
    return node.attributes.get_int("to")


def fp32_values(model: ir.Model) -> set[ir.Value]:
    """Values typed float32, from the model's own type records and Cast targets (re-inferring types
    can clash with the records a converter already wrote)."""
    ir = require("onnx_ir", "export")

    g = model.graph
    found = set()
    for v in [*g.inputs, *g.outputs, *g.initializers.values(), *(o for n in g for o in n.outputs)]:
        producer = v.producer()
        if producer is not None and producer.op_type == "Cast":
            dtype = ir.DataType(cast_to(producer))
        else:
            dtype = v.const_value.dtype if v.const_value is not None else v.dtype
        if dtype == ir.DataType.FLOAT:
            found.add(v)
    return found


def drop_fp16_round_trips(model: ir.Model) -> int:
    """Remove Cast(fp32→fp16)→Cast(fp16→fp32) chains, so that fp32 values pass between two nodes kept
    in fp32 without being squeezed through fp16 on the way (which overflows past 65504).

    Returns the number of Casts removed."""
    ir = require("onnx_ir", "export")

    g = model.graph
    fp32 = fp32_values(model)
    removed = 0
    for down in list(g):
        if down.op_type != "Cast" or cast_to(down) != ir.DataType.FLOAT16 or down.inputs[0] not in fp32:
            continue
        half = down.outputs[0]
        for up, _ in list(half.uses()):
            # A graph output keeps its name, so a chain that ends in one stays.
            if up.op_type == "Cast" and cast_to(up) == ir.DataType.FLOAT and not up.outputs[0].is_graph_output():
                up.outputs[0].replace_all_uses_with(down.inputs[0])
                g.remove(up, safe=True)
                removed += 1
        if not half.is_graph_output() and not half.uses():
            g.remove(down, safe=True)
            removed += 1
    return removed
