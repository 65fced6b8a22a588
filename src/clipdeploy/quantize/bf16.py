"""bf16: OpenVINO runs the fp32 file with INFERENCE_PRECISION_HINT=bf16 (the setting is on its PrecisionSpec).

No file of its own is made: the gate runs the fp32 file on OpenVINO under that setting, against fp32 on
ONNX Runtime, and the manifest records a bf16 variant whose file is the fp32 one.
"""

from __future__ import annotations

from clipdeploy.quantize.make import MadeVariant, MakeRequest, runs_file


def make(req: MakeRequest) -> MadeVariant:
    """The bf16 make step: nothing to write (``runs_file``)."""
    return runs_file(req)
