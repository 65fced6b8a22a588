"""ONNX graph helpers for the precision stage: load and save (large models too), and observe the
values of intermediate tensors on real inputs."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

# Same threshold as the exporter: protobuf cannot hold more than 2 GiB in one message.
EXTERNAL_DATA_THRESHOLD = 1_500_000_000
FLOAT_TYPES = (1, 10)  # onnx.TensorProto.FLOAT, FLOAT16


def load(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=True)


def save(model: Any, path: Path) -> list[Path]:
    """Save ``model``; weights go to ``<name>.data`` when the model is too large for one protobuf.

    Returns the side files written.
    """
    import onnx

    large = model.ByteSize() > EXTERNAL_DATA_THRESHOLD if fits(model) else True
    if large:
        data = path.with_name(path.name + ".data")
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
        return [data]
    onnx.save(model, str(path))
    return []


def fits(model: Any) -> bool:
    """Whether protobuf can serialize the model in one message (under 2 GiB)."""
    try:
        model.ByteSize()
        return True
    except ValueError:  # protobuf refuses to size a message over 2 GiB
        return False


def check(path: Path) -> None:
    """Full ONNX check, type inference included: a variant must be a valid model, not one only
    ONNX Runtime tolerates."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def float_tensors(model: Any) -> dict[str, int]:
    """Every float tensor a node produces, with its element type, from ONNX shape inference."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, data_prop=False) if fits(model) else model
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    types.update({o.name: o.type.tensor_type.elem_type for o in inferred.graph.output})
    produced = {o for n in model.graph.node for o in n.output if o}
    return {name: t for name, t in types.items() if name in produced and t in FLOAT_TYPES}


def observe(model_path: Path, names: Iterable[str], feeds: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """Run the model on each feed and yield the values of ``names`` (intermediate tensors)."""
    import onnx
    import onnxruntime as ort

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


def fp32_tensors(model: Any) -> set[str]:
    """Tensors typed float32, from the model's own type records and Cast targets (re-inferring types
    can clash with the records a converter already wrote)."""
    from onnx import TensorProto

    g = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    for n in g.node:
        if n.op_type == "Cast":
            types[n.output[0]] = next(a.i for a in n.attribute if a.name == "to")
    return {name for name, t in types.items() if t == TensorProto.FLOAT}


def drop_fp16_round_trips(model: Any) -> int:
    """Remove Cast(fp32→fp16)→Cast(fp16→fp32) chains, so that fp32 values pass between two nodes kept
    in fp32 without being squeezed through fp16 on the way (which overflows past 65504)."""
    from onnx import TensorProto

    g = model.graph
    fp32 = fp32_tensors(model)
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def to(n: Any) -> int:
        return next(a.i for a in n.attribute if a.name == "to")

    outputs = {o.name for o in g.output}
    removed: set[int] = set()
    for down in g.node:
        if down.op_type != "Cast" or to(down) != TensorProto.FLOAT16 or down.input[0] not in fp32:
            continue
        for up in consumers.get(down.output[0], []):
            # A graph output keeps its name, so a chain that ends in one stays.
            if up.op_type == "Cast" and to(up) == TensorProto.FLOAT and up.output[0] not in outputs:
                for c in consumers.get(up.output[0], []):
                    c.input[:] = [down.input[0] if i == up.output[0] else i for i in c.input]
                removed.add(id(up))
        if down.output[0] not in outputs and all(id(c) in removed for c in consumers.get(down.output[0], [])):
            removed.add(id(down))
    kept = [n for n in g.node if id(n) not in removed]
    del g.node[:]
    g.node.extend(kept)
    return len(removed)


def toposort(g: Any) -> None:
    """Order nodes so each comes after the producers of its inputs, as the ONNX spec requires."""
    available = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending = list(g.node)
    ordered = []
    while pending:
        progressed = []
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                progressed.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if not progressed:
            raise RuntimeError(f"graph has a cycle or a missing input near {rest[0].name}")
        ordered += progressed
        pending = rest
    del g.node[:]
    g.node.extend(ordered)
