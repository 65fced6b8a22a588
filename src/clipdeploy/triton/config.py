"""`TritonConfig`: everything `clipdeploy triton` takes. The CLI and the API both resolve through it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from clipdeploy import precisions
from clipdeploy.artifact.manifest import FORMATS
from clipdeploy.errors import UsageError
from clipdeploy.options import opt
from clipdeploy.triton import releases

ONNX_DEVICES = ("cpu", "gpu")


@dataclass
class TritonConfig:
    """Everything `clipdeploy triton` takes. CLI and API both resolve through this."""

    artifacts: list[Path]  # artifact directories (made by export/quantize/build, or `clipdeploy run`)
    output: Path  # the model repository to write
    formats: tuple[str, ...] = field(  # which variant formats to serve: onnx and/or tensorrt
        default=FORMATS,
        metadata=opt("serve only this format (repeatable)", flag="--format", action="append",
                     choices=("onnx", "tensorrt"), default_text="every format present"),
    )  # fmt: skip
    precisions: tuple[str, ...] = field(  # empty: every accepted one
        default=(),
        metadata=opt("serve only this precision (repeatable)", flag="--precision", action="append",
                     choices=precisions.names, default_text="every accepted one"),
    )  # fmt: skip
    names: tuple[str, ...] = field(  # default: from the directory
        default=(),
        metadata=opt("model-name prefix, once per artifact in order", flag="--name", action="append",
                     metavar="NAME", default_text="the directory name"),
    )  # fmt: skip
    onnx_max_batch_size: int = field(  # ONNX models' batch axis has no profile
        default=64, metadata=opt("max_batch_size of ONNX models (engines take theirs from the profile)")
    )
    onnx_device: str = field(  # not --device: this is the kind of Triton instance, on the server
        default="cpu",
        metadata=opt("Triton instance kind of ONNX models: cpu (validated here) or gpu (CUDA EP)", choices=ONNX_DEVICES),
    )
    server_has_vnni: bool = field(  # whether CPU instances may serve int8 ONNX (see plan.CPU_INT8)
        default=False,
        metadata=opt("the Triton server's CPU has VNNI (avx512_vnni, avx_vnni or amx_int8): serve int8 ONNX "
                     "models on CPU instances too"),
    )  # fmt: skip
    instances: int = field(default=1, metadata=opt("instances of each tower model, per GPU (or in all, on CPU)"))
    python_instances: int = field(default=2, metadata=opt("CPU instances of each preprocess/tokenize/normalize model"))
    max_queue_delay_us: int = field(
        default=100, metadata=opt("dynamic batching queue delay in microseconds", metavar="US")
    )
    tensorrt_version: str | None = field(
        default=None, metadata=opt("serve engines of this TensorRT version when several exist", metavar="V")
    )
    triton_release: str | None = field(
        default=None, metadata=opt("the Triton release you will run; warns on a TensorRT mismatch", metavar="YY.MM")
    )
    triton_tensorrt: str | None = field(  # for releases not in the table
        default=None, metadata=opt("that release's TensorRT version, if clipdeploy does not know it", metavar="V")
    )
    force: bool = field(default=False, metadata=opt("replace an existing repository written by this command"))

    def check(self) -> None:
        if not self.artifacts:
            raise UsageError("no artifact directories given; pass at least one DIR")
        if self.names and len(self.names) != len(self.artifacts):
            raise UsageError(
                f"--name was given {len(self.names)} times for {len(self.artifacts)} artifacts; "
                "give one per artifact, in order"
            )
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise UsageError(f"--format {bad[0] if bad else '(none)'!r} is not one of {', '.join(FORMATS)}")
        for p in self.precisions:
            precisions.get(p)  # an unknown name: one line with a suggestion
        if self.onnx_device not in ONNX_DEVICES:
            raise UsageError(f"--onnx-device {self.onnx_device!r} is not one of {', '.join(ONNX_DEVICES)}")
        for name in ("onnx_max_batch_size", "instances", "python_instances"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)} must be 1 or more")
        if self.max_queue_delay_us < 0:
            raise UsageError(f"--max-queue-delay-us {self.max_queue_delay_us} must be 0 or more")
        if self.triton_release is not None and not re.fullmatch(r"\d\d\.\d\d", self.triton_release):
            raise UsageError(f"--triton-release {self.triton_release!r} is not a release name like 25.08")
        for flag, v in (("--triton-tensorrt", self.triton_tensorrt), ("--tensorrt-version", self.tensorrt_version)):
            if v is not None and releases.base(v) is None:
                raise UsageError(f"{flag} {v!r} is not a version like 10.13.3")

