"""`clipdeploy quantize`'s options: one dataclass that the CLI, the YAML pipeline and the API all resolve through."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from clipdeploy import precisions
from clipdeploy.calibration import dataset
from clipdeploy.errors import UsageError
from clipdeploy.options import THREADS, opt
from clipdeploy.quantize.gate import DEFAULT_THRESHOLDS, GateThresholds

METHODS = ("minmax", "entropy", "percentile")  # int8 activation calibration: ONNX Runtime's calibrators


@dataclass
class QuantizeConfig:
    """Everything `clipdeploy quantize` takes. CLI, YAML and API all resolve through this."""

    artifact: Path  # the artifact directory, made by `clipdeploy export`
    # The help and the choices are read from the precision registry when the parser is built.
    precision: str = field(metadata=opt(precisions.quantized_help, choices=precisions.quantized))
    calib_images: list[Path] = field(
        default_factory=list, metadata=opt("image folders (recursive) or .tar shards", nargs="+", metavar="PATH")
    )
    calib_texts: Path | None = field(
        default=None,
        metadata=opt("captions, one per line", metavar="FILE", default_text="ImageNet classes x open_clip's templates"),
    )
    method: str = field(
        default="minmax", metadata=opt("int8 activation calibration", choices=METHODS)
    )
    samples: int = field(default=300, metadata=opt("calibration samples per tower"))
    holdout: int = field(
        default=256,
        metadata=opt(
            "held-out samples per tower for the gate, disjoint from calibration, at least 32 (data too short for "
            "--samples plus --holdout is shared evenly between the two)"
        ),
    )
    min_samples: int = field(default=32, metadata=opt("fewest calibration samples accepted"))
    seed: int = field(default=0, metadata=opt("seed that picks the samples"))
    gate_prompts: Path | None = field(
        default=None,
        metadata=opt(
            "class prompts, one per line, for top-1 agreement", metavar="FILE",
            default_text="ImageNet 'a photo of a {}.'",
        ),
    )  # fmt: skip
    # Gate thresholds; None takes the precision's default (DEFAULT_THRESHOLDS).
    min_cosine: float | None = field(
        default=None,
        metadata=opt(
            "lowest cosine of any held-out sample, in (-1, 1]", default_text=precisions.gate_defaults("min_cosine")
        ),
    )
    min_mean_cosine: float | None = field(
        default=None, metadata=opt("lowest mean cosine", default_text=precisions.gate_defaults("min_mean_cosine")),
    )
    min_top1: float | None = field(
        default=None,
        metadata=opt("lowest top-1 agreement, in [0, 1]", default_text=precisions.gate_defaults("min_top1")),
    )
    recover: bool = field(
        default=True,
        metadata=opt("fail at once when int8 misses its gate (no recovery by keeping nodes in higher precision)",
                     negate="--no-recover"),
    )  # fmt: skip
    max_fp32_fraction: float = field(
        default=0.10, metadata=opt("most quantizable nodes recovery may keep unquantized")
    )
    max_rounds: int = field(default=5, metadata=opt("recovery rounds at most"))
    # Nodes a finding from elsewhere (Polygraphy's `debug precision`, an earlier run's manifest) says to leave
    # unquantized: kept from the first build on, before any node recovery picks itself.
    keep_nodes: list[str] = field(
        default_factory=list,
        metadata=opt("calibrated precisions: keep this MatMul/Gemm/Conv node unquantized (repeatable, or "
                     "comma-separated; names as in the manifest's recovery.kept_in_higher_precision)",
                     flag="--keep-node", action="append", metavar="NODE", default_text="none"),
    )  # fmt: skip
    fp8_patch_embedding: str = field(
        default="fp16",
        metadata=opt("fp8 only: keep the patch embedding (the Conv that reads the pixels) in fp16, NVIDIA's "
                     "recipe for accuracy, or quantize it to fp8 too", choices=("fp16", "fp8")),
    )  # fmt: skip
    threads: int | None = field(default=None, metadata=THREADS)  # for calibration and the gate
    force: bool = field(default=False, metadata=opt("replace an existing variant of this precision"))

    def keep_node_names(self) -> list[str]:
        """--keep-node's names, each given alone or comma-separated."""
        return [n.strip() for item in self.keep_nodes for n in item.split(",") if n.strip()]

    def thresholds(self) -> GateThresholds:
        base = DEFAULT_THRESHOLDS[self.precision]
        return GateThresholds(
            min_cosine=self.min_cosine if self.min_cosine is not None else base.min_cosine,
            min_mean_cosine=self.min_mean_cosine if self.min_mean_cosine is not None else base.min_mean_cosine,
            min_top1=self.min_top1 if self.min_top1 is not None else base.min_top1,
        )

    def check(self) -> None:
        """Refuse settings that would make the gate meaningless. The CLI, YAML pipeline and API all call it."""
        made = precisions.quantized()
        if precisions.get(self.precision).name not in made:
            raise UsageError(f"--precision {self.precision!r} is not one of {', '.join(made)}")
        refusal = precisions.cpu_refusal(self.precision)  # its gate must run here, on the CPU that serves it
        if refusal:
            raise UsageError(refusal)
        if self.method not in METHODS:
            raise UsageError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        for name in ("samples", "min_samples"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)} must be 1 or more")
        if self.holdout < dataset.MIN_HELD_OUT:
            raise UsageError(
                f"--holdout {self.holdout} is below the {dataset.MIN_HELD_OUT} held-out samples per tower a gate "
                f"needs to mean anything; pass --holdout {dataset.MIN_HELD_OUT} or more "
                f"(default {QuantizeConfig.holdout})"
            )
        if self.samples < self.min_samples:
            raise UsageError(f"--samples {self.samples} is below --min-samples {self.min_samples}")
        if self.keep_nodes and not precisions.get(self.precision).calibrated:
            calibrated = [n for n in precisions.names() if precisions.get(n).calibrated]
            raise UsageError(f"--keep-node applies to calibrated precisions ({', '.join(calibrated)}), "
                             f"not {self.precision}")
        for name in ("min_cosine", "min_mean_cosine"):
            value = getattr(self, name)
            if value is not None and not -1 < value <= 1:  # `not` also refuses NaN
                raise UsageError(f"--{name.replace('_', '-')} {value} is out of range: a cosine lies in (-1, 1]; "
                                 "pass e.g. 0.95 (a value above 1 no variant can reach, -1 or below accepts any)")
        for name in ("min_top1", "max_fp32_fraction"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise UsageError(f"--{name.replace('_', '-')} {value} must be between 0 and 1 (a fraction)")
        if self.max_rounds < 0:
            raise UsageError(f"--max-rounds {self.max_rounds} must be 0 or more")
        if self.seed < 0:
            raise UsageError(f"--seed {self.seed} must be 0 or more")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads {self.threads} must be 1 or more")
