"""Peers that run a plain ``torch.onnx.export(dynamo=True)`` of the open_clip model on ONNX Runtime or OpenVINO.

What a user gets without clipdeploy: the reference model's ``encode_image`` / ``encode_text`` exported
with the dynamo exporter's defaults (a dynamic batch axis, nothing else), then opened with the
runtime's defaults and the bench's thread count. The export happens when the contender opens,
untimed, in the measuring process (it needs torch, as the PyTorch reference does).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy.artifact.view import ArtifactView
from clipdeploy.benchmarks.harness import Timer, perf_counter_timer
from clipdeploy.benchmarks.torch_reference import build_reference_model
from clipdeploy.deps import require
from clipdeploy.runtime.backends.onnxruntime import graph_optimization_level

# Bench backend name -> the runtime that runs the plain export.
PLAIN_ORT = "onnxruntime.plain"
PLAIN_OV = "openvino.plain"
PLAIN_PEERS = {PLAIN_ORT: "onnxruntime", PLAIN_OV: "openvino"}
_MAX_BATCH = 1024  # the batch axis the plain export declares


def export_plain(model: Any, tower: str, path: Path, context_length: int) -> None:
    """``torch.onnx.export(dynamo=True)`` of ``model.encode_image`` or ``model.encode_text`` with a dynamic batch."""
    torch = require("torch", "export")

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: Any) -> Any:
            return self.model.encode_image(x) if tower == "image" else self.model.encode_text(x)

    if tower == "image":
        size = model.visual.image_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        example = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    else:
        example = torch.randint(1, 100, (2, context_length), generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():  # the exporter prints its progress
        program = torch.onnx.export(Tower().eval(), (example,), dynamic_shapes=({0: batch},), dynamo=True)
    program.save(str(path))


class PlainExportContender:
    """A plain export of each measured tower, run on ONNX Runtime or OpenVINO with their defaults."""

    timer: Timer = staticmethod(perf_counter_timer)  # host arrays in and out: synchronous

    def __init__(self, spec: Any, view: ArtifactView, options: Any) -> None:
        torch = require("torch", "export")

        self.spec = spec
        self.runtime = PLAIN_PEERS[spec.backend]
        torch.set_num_threads(options.threads)
        model = build_reference_model(view.model, options.checkpoint)
        self._context_length = view.context_length
        self._tmp = tempfile.TemporaryDirectory(prefix="clipdeploy-plain-")  # kept while the sessions live
        self._run: dict[str, Any] = {}
        for tower in spec.towers:
            path = Path(self._tmp.name) / f"{tower}.onnx"
            export_plain(model, tower, path, self._context_length)
            self._run[tower] = self._open(path, options)
        del model

    def _open(self, path: Path, options: Any) -> Any:
        if self.runtime == "onnxruntime":
            ort = require("onnxruntime", "cpu")
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = options.threads, 1
            so.graph_optimization_level = graph_optimization_level(ort, options.graph_optimization_level)
            session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            return lambda x: session.run(None, {name: x})[0]
        ov = require("openvino", "openvino")
        # OpenVINO's defaults (on CPUs with bf16 that means bf16 inference), with the bench's threads.
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": str(options.threads)})
        request = compiled.create_infer_request()
        return lambda x: np.array(request.infer({0: x})[compiled.output(0)], copy=True)

    def unsupported(self, tower: str, seq_len: int | None, context_length: int) -> str | None:
        if tower == "text" and seq_len is not None and seq_len != self._context_length:
            return "a plain export of open_clip's encode_text takes only full-length ids"
        return None

    def encode(self, tower: str, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._run[tower](x), dtype=np.float32)

    def describe(self) -> str:
        return f"a plain torch.onnx.export(dynamo=True) of open_clip's model on {self.runtime} (its defaults)"
