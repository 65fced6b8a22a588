"""Triton Python backend: raw tower outputs -> L2-normalized float32 embeddings.

Written by `clipdeploy triton`. The same normalization as ``clipdeploy.load(...).encode_image`` and
``encode_text`` (and torch.nn.functional.normalize, which open_clip uses): x / max(||x||, 1e-12).
Needs only numpy.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend


class TritonPythonModel:
    """RAW (the tower's output) -> EMBEDDING (float32, unit length)."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().astype(np.float32)
            norm = np.linalg.norm(x, axis=-1, keepdims=True)
            y = (x / np.maximum(norm, 1e-12)).astype(np.float32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, y)]))
        return responses
