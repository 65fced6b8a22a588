"""What `clipdeploy build` takes. CLI and API both resolve through ``BuildConfig``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from clipdeploy import precisions
from clipdeploy.errors import UsageError
from clipdeploy.artifact.manifest import TOWERS
from clipdeploy.options import DEVICE_HELP, cuda_index, opt
from clipdeploy.runtime.tensorrt_compat import HARDWARE_COMPAT

Range = tuple[int, int, int]  # min, opt, max of one dynamic axis


def check_range(name: str, r: Range) -> Range:
    if len(r) != 3 or not all(isinstance(v, int) for v in r):
        raise UsageError(f"{name} range {r!r} must be three integers MIN:OPT:MAX")
    lo, opt, hi = r
    if not 1 <= lo <= opt <= hi:
        raise UsageError(f"{name} range {lo}:{opt}:{hi} must satisfy 1 <= MIN <= OPT <= MAX")
    return (lo, opt, hi)


def show_range(r: Range) -> str:
    return ":".join(map(str, r))


# `--device` of build and validate: a CUDA device (cpu refused: TensorRT needs a GPU).
CUDA_DEVICE = opt(DEVICE_HELP + "; TensorRT needs a GPU, so cpu is refused", metavar="DEVICE", parse=cuda_index,
                  default_text="0")  # fmt: skip


@dataclass
class BuildConfig:
    """Everything `clipdeploy build` takes."""

    artifact: Path  # the artifact directory made by `clipdeploy export` (and `quantize`)
    precision: str = field(default=precisions.REFERENCE, metadata=opt("ONNX variant to compile", choices=precisions.names))
    towers: tuple[str, ...] = field(  # empty builds every tower in the manifest
        default=(),
        metadata=opt("build only this tower (repeatable)", flag="--tower", action="append", choices=TOWERS,
                     default_text="all"),
    )  # fmt: skip
    batch: Range = field(  # min/opt/max of the batch axis in the optimization profile
        default=(1, 8, 64),
        metadata=opt("batch profile", metavar="MIN:OPT:MAX", parse=lambda _, text: parse_range(text), show=show_range),
    )
    shapes: dict[str, Range] = field(default_factory=dict)  # min/opt/max of other named dynamic axes, e.g. "sequence"
    workspace: int | None = field(  # workspace pool limit in bytes; None lets TensorRT use what the GPU has
        default=None,
        metadata=opt("workspace memory limit, e.g. 4GiB", metavar="SIZE", parse=lambda _, text: parse_size(text),
                     default_text="TensorRT's"),
    )  # fmt: skip
    opt_level: int = field(  # TensorRT's default 3; 0 ignores the timing cache
        default=3, metadata=opt("builder optimization level", choices=range(6), metavar="0-5")
    )
    timing_cache: Path | None = field(  # loaded if present, merged into and saved after the build
        default=None, metadata=opt("timing cache to load and merge into (created if missing)", metavar="FILE")
    )
    hardware_compat: str = field(  # portable plans are somewhat slower
        default="none",
        metadata=opt(
            "build a plan that runs on other GPUs too (slower); none: this GPU's compute capability only",
            choices=HARDWARE_COMPAT,
        ),
    )
    version_compat: bool = field(
        default=False,
        metadata=opt(
            "build a plan that later TensorRT versions of the same major can load; it embeds host code, "
            "so loading it needs engine_host_code_allowed=True"
        ),
    )
    tf32: bool = field(  # faster on Ampere+, ~1e-3 relative error
        default=True, metadata=opt("keep fp32 layers off TF32 tensor cores", negate="--no-tf32")
    )
    device: int = field(default=0, metadata=CUDA_DEVICE)  # the plan is named after its compute capability
    validate: bool = field(  # compare each new engine with its ONNX source right after the build
        default=True, metadata=opt("skip the comparison with the ONNX source", negate="--no-validate")
    )

    def __post_init__(self) -> None:
        self.artifact = Path(self.artifact)
        precisions.get(self.precision)  # an unknown name: one line with a suggestion
        unknown = [t for t in self.towers if t not in TOWERS]
        if unknown:
            raise UsageError(f"tower(s) {', '.join(unknown)} unknown; choose from {', '.join(TOWERS)}")
        self.batch = check_range("batch", tuple(self.batch))  # type: ignore[arg-type]
        self.shapes = {name: check_range(name, tuple(r)) for name, r in self.shapes.items()}  # type: ignore[arg-type]
        if "batch" in self.shapes:
            raise UsageError("give the batch range with batch= (CLI: --batch MIN:OPT:MAX), not as a shape")
        if self.workspace is not None and self.workspace < 1:
            raise UsageError(f"workspace {self.workspace} must be a positive number of bytes")
        if not (isinstance(self.opt_level, int) and 0 <= self.opt_level <= 5):
            raise UsageError(f"opt_level {self.opt_level!r} must be an integer from 0 to 5")
        if self.hardware_compat not in HARDWARE_COMPAT:
            raise UsageError(f"hardware_compat {self.hardware_compat!r} is not one of {', '.join(HARDWARE_COMPAT)}")
        if not isinstance(self.device, int) or self.device < 0:
            raise UsageError(f"device {self.device!r} must be a CUDA device number, 0 or more")
        if self.timing_cache is not None:
            self.timing_cache = Path(self.timing_cache)


def parse_range(text: str) -> Range:
    """'1:8:64' -> (1, 8, 64); one number N means N:N:N."""
    parts = text.split(":")
    if len(parts) == 1:
        parts = parts * 3
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"range {text!r} is not MIN:OPT:MAX integers, e.g. 1:8:64") from None
    return check_range(text, values)  # type: ignore[arg-type]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """'4GiB' -> 4294967296; plain numbers are bytes."""
    m = _SIZE.match(text)
    unit = (m.group(2) or "").lower().removesuffix("b") if m else None
    if not m or unit not in _UNITS:
        raise UsageError(f"size {text!r} is not a byte count such as 4GiB, 512MiB or 1000000")
    return int(float(m.group(1)) * _UNITS[unit])
