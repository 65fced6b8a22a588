"""Triton Python backend: UTF-8 strings -> token ids, with clipdeploy's torch-free tokenizer.

Written by `clipdeploy triton`. The clipdeploy modules it runs are vendored beside it (``clipdeploy/``),
with the artifact's tokenizer config and files (``assets/``), so the server needs only numpy, ftfy and
regex (and ``tokenizers`` for Hugging Face tokenizers), not torch and not clipdeploy itself. Each
string gets exactly the ids ``clipdeploy.load(...).tokenize`` (and so open_clip) gives, padded to
the context length.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # the vendored clipdeploy, whatever else the server has installed

import triton_python_backend_utils as pb_utils  # noqa: E402  (provided by Triton's Python backend)

from clipdeploy.errors import ClipDeployError  # noqa: E402
from clipdeploy.runtime.text import load_tokenizer  # noqa: E402


class TritonPythonModel:
    """TEXT (TYPE_STRING, UTF-8) -> TOKENS (integer ids, context length wide)."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        with open(os.path.join(HERE, "assets", "clipdeploy.json"), encoding="utf-8") as f:
            spec = json.load(f)
        self.input_name = spec["input"]
        self.output_name = spec["output"]
        self.tokenizer = load_tokenizer(spec["tokenizer"], os.path.join(HERE, "assets"))
        out = pb_utils.get_output_config_by_name(config, self.output_name)
        self.dtype = pb_utils.triton_string_to_numpy(out["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().reshape(-1)
            try:
                texts = [t.decode("utf-8") if isinstance(t, (bytes, bytearray)) else str(t) for t in raw]
                ids = self.tokenizer(texts)
            except (UnicodeDecodeError, ClipDeployError) as e:  # a bad string fails its own request only
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))))
                continue
            tensor = pb_utils.Tensor(self.output_name, ids.astype(self.dtype, copy=False))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses

    def finalize(self):
        self.tokenizer = None
