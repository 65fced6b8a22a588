"""``BenchConfig``: everything `clipdeploy bench` takes. CLI, YAML (the pipeline's ``bench:`` section) and API
all resolve through this dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from clipdeploy.artifact.manifest import TOWERS
from clipdeploy.benchmarks.contenders import BACKENDS, DEVICES, backends, default_precisions
from clipdeploy.benchmarks.harness import TimingConfig
from clipdeploy.errors import UsageError
from clipdeploy.options import DEVICE_HELP, THREADS, csv, device_kind, integer, opt, show_csv
from clipdeploy.precisions import names as precision_names

__all__ = ["BenchConfig", "DEFAULT_BATCHES"]

DEFAULT_BATCHES = (1, 8, 32)
_OPT_LEVELS = ("disable", "basic", "extended", "all")


@dataclass
class BenchConfig:
    """Everything `clipdeploy bench` takes. CLI and API both resolve through this."""

    artifact: Path  # the artifact directory to measure
    output: Path | None = None  # directory for bench.json, bench.md and bench.png; None writes nothing
    backends: tuple[str, ...] = field(  # which of torch, onnxruntime, tensorrt to run
        default=BACKENDS,
        metadata=opt(f"comma-separated, from {','.join(BACKENDS)}; unavailable ones are skipped with a reason",
                     metavar="LIST", parse=csv(backends), default_text="all"),
    )  # fmt: skip
    precisions: tuple[str, ...] | None = field(  # None: those the runtime would pick here
        default=None,
        metadata=opt(
            f"variant precisions to measure, from {','.join(precision_names())}; PyTorch always runs the reference",
            metavar="LIST", parse=csv(precision_names),
            default_text="those the runtime would pick on this device: "
            f"{' and '.join(default_precisions('cpu'))} on CPU",
        ),
    )  # fmt: skip
    batches: tuple[int, ...] = field(  # each measured on its own
        default=DEFAULT_BATCHES,
        metadata=opt("batch sizes", flag="--batch", metavar="LIST", parse=csv(item=integer(1)), show=show_csv),
    )
    towers: tuple[str, ...] = field(
        default=TOWERS, metadata=opt("towers to measure", metavar="LIST", parse=csv(TOWERS), show=show_csv)
    )
    timing: TimingConfig = field(default_factory=TimingConfig)  # iterations, warm-up, time budget
    threads: int | None = field(default=None, metadata=THREADS)  # for every contender; None: the cores available
    device: str = field(  # cpu, cuda, or auto (cuda when nvidia-smi sees a GPU)
        default="auto",
        metadata=opt(DEVICE_HELP + "; bench runs on CUDA device 0", metavar="DEVICE", parse=device_kind),
    )
    checkpoint: Path | None = field(  # for the PyTorch reference
        default=None, metadata=opt("the checkpoint the artifact was exported from (for PyTorch)", metavar="FILE")
    )
    graph_optimization_level: str = field(
        default="all",
        metadata=opt(f"ONNX Runtime graph optimizations: {', '.join(_OPT_LEVELS)}", metavar="LEVEL"),
    )
    prompt_length: int | None = field(
        default=None,
        metadata=opt("short text length", metavar="N", parse=integer(2), default_text="the longest bundled prompt"),
    )
    isolate: bool = field(  # measure each contender in a fresh process
        default=True,
        metadata=opt("measure every contender in this process instead of one process each", negate="--in-process"),
    )
    progress: bool = field(default=True, metadata=opt("no progress bar", negate="--no-progress"))  # tqdm on stderr
    end_to_end: int = field(  # 0: off; else JPEG files of ~12 MP timed from file to embedding
        default=0,
        metadata=opt("also time N real-size JPEG files (the bundled photos upscaled to ~12 MP) to embeddings "
                     "with exact and fast_decode preprocessing, and the fast_decode cosine vs exact",
                     metavar="N", parse=integer(0), default_text="0: off"),
    )  # fmt: skip
    machine: str | None = field(  # None: CPU model, cores, memory, GPU
        default=None,
        metadata=opt("name the machine in the reports", metavar="NAME",
                     default_text="CPU model, cores, memory, GPU"),
    )  # fmt: skip

    def check(self) -> None:
        if not self.batches:
            raise UsageError("--batch is empty; pass batch sizes such as 1,8,32")
        bad = [b for b in self.batches if b < 1]
        if bad:
            raise UsageError(f"--batch {bad[0]} must be 1 or more")
        if not self.towers:
            raise UsageError("--towers is empty; pass image, text or image,text")
        for t in self.towers:
            if t not in TOWERS:
                raise UsageError(f"tower {t!r} is not one of {', '.join(TOWERS)}; e.g. --towers image,text")
        if not self.backends:
            raise UsageError("--backends is empty; pass e.g. torch,onnxruntime")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads {self.threads} must be 1 or more")
        if self.device not in DEVICES:
            raise UsageError(f"--device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.graph_optimization_level not in _OPT_LEVELS:
            raise UsageError(
                f"--graph-optimization-level {self.graph_optimization_level!r} is not one of {', '.join(_OPT_LEVELS)}"
            )
        if self.prompt_length is not None and self.prompt_length < 2:
            raise UsageError(f"--prompt-length {self.prompt_length} must be 2 or more (start and end tokens)")
