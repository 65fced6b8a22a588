"""Triton Python backend: raw image bytes -> pixels, with clipdeploy's torch-free preprocessing.

Written by `clipdeploy triton`. The clipdeploy modules it runs are vendored beside it (``clipdeploy/``),
with the artifact's preprocessing config (``assets/clipdeploy.json``), so the server needs only
numpy and pillow, not torch and not clipdeploy itself. Each image gets exactly the pixels
``clipdeploy.load(...).preprocess`` (and so open_clip) gives.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # the vendored clipdeploy, whatever else the server has installed

import triton_python_backend_utils as pb_utils  # noqa: E402  (provided by Triton's Python backend)

from clipdeploy.errors import ClipDeployError  # noqa: E402
from clipdeploy.runtime.preprocess import PreprocessConfig, Preprocessor  # noqa: E402


class TritonPythonModel:
    """IMAGE (TYPE_STRING, encoded image files) -> PIXELS (float NCHW)."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        with open(os.path.join(HERE, "assets", "clipdeploy.json"), encoding="utf-8") as f:
            spec = json.load(f)
        self.input_name = spec["input"]
        self.output_name = spec["output"]
        self.preprocess = Preprocessor(PreprocessConfig.from_dict(spec["preprocess"]))
        out = pb_utils.get_output_config_by_name(config, self.output_name)
        self.dtype = pb_utils.triton_string_to_numpy(out["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            blobs = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().reshape(-1)
            try:
                pixels = self.preprocess([bytes(b) for b in blobs])
            except ClipDeployError as e:  # one bad image fails its own request, not the batch
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))))
                continue
            tensor = pb_utils.Tensor(self.output_name, pixels.astype(self.dtype, copy=False))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses

    def finalize(self):
        self.preprocess = None
