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

    large = model.ByteSize() > EXTERNAL_DATA_THRESHOLD if _fits(model) else True
    if large:
        data = path.with_name(path.name + ".data")
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
        return [data]
    onnx.save(model, str(path))
    return []


def _fits(model: Any) -> bool:
    try:
        model.ByteSize()
        return True
    except ValueError:  # protobuf refuses to size a message over 2 GiB
        return False


def float_tensors(model: Any) -> dict[str, int]:
    """Every float tensor a node produces, with its element type, from ONNX shape inference."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, data_prop=False) if _fits(model) else model
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
    for values in observe(model_path, names, feeds):
        for name, v in values.items():
            if v.dtype.kind == "f" and v.size:
                result[name] = max(result.get(name, 0.0), float(np.nanmax(np.abs(v))))
    return result
