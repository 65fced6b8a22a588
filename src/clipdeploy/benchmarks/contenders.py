"""Who is measured: every variant in the manifest that a backend here can run, and the PyTorch reference.

Discovery reads only the manifest, so new precisions and formats (fp16, int8, TensorRT plans) are
picked up as they appear. A contender is opened only inside the process that measures it.
Compiled variants run through the public runtime (``clipdeploy.load`` and the session's
``encode_pixels`` / ``encode_tokens``): numpy in, numpy out, as users call it. PyTorch gets the same
contract: host arrays in, host arrays out, so every contender pays for the same copies.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

import clipdeploy
from clipdeploy.benchmarks.harness import Timer, cuda_event_timer, perf_counter_timer
from clipdeploy.benchmarks.inputs import text_is_dynamic
from clipdeploy.benchmarks.plain_export import PLAIN_PEERS, PlainExportContender
from clipdeploy.benchmarks.torch_reference import build_reference_model, prefix_text_encoder
from clipdeploy.deps import require
from clipdeploy.errors import ArtifactError, UsageError
from clipdeploy.artifact.view import ArtifactView
from clipdeploy.precisions import REFERENCE, by_default, rank
from clipdeploy.runtime.backends import registry
from clipdeploy.runtime.backends.registry import BenchSettings, LoadSettings, has_module
from clipdeploy.runtime.session import ClipSession

TORCH = "torch"
AUTOCAST = "fp16-autocast"  # PyTorch's own mixed precision, a peer rather than a variant
DEVICES = ("auto", "cpu", "cuda")


COMPILE = "torch.compile"


def backends() -> tuple[str, ...]:
    """What a benchmark can measure: PyTorch (the reference), ``torch.compile`` and plain exports on ONNX
    Runtime and OpenVINO (peers), and every registered runtime backend."""
    return (TORCH, COMPILE, *PLAIN_PEERS, *registry.names())


BACKENDS = backends()  # the built-in ones, for defaults; a backend registered later is still accepted


def report_order() -> tuple[str, ...]:
    """The order contenders are listed in the report: the reference, every registered backend (in registration
    order), then the peers."""
    return (TORCH, *registry.names(), COMPILE, *PLAIN_PEERS)


def default_precisions(device: str, backend: str = "onnxruntime") -> tuple[str, ...]:
    """What is measured unasked on ``device``: what ``backend`` runs there, less what it only emulates."""
    spec = registry.get(backend)
    return by_default(backend, spec.bench_target(device) if spec.bench_target else backend)


def precision_rank(precision: str) -> float:
    """Display order of a contender's precision: the registry's, with PyTorch autocast after the reference."""
    return rank(REFERENCE) + 0.5 if precision == AUTOCAST else rank(precision)


@dataclass(frozen=True)
class ContenderSpec:
    """One thing to measure: a backend running one precision on one device."""

    backend: str  # "torch", "torch.compile", "onnxruntime.plain", "openvino.plain" or a registered backend
    precision: str  # a variant precision; for PyTorch "fp32" or "fp16-autocast"
    device: str  # "cpu" or "cuda"
    towers: tuple[str, ...]  # the towers it runs, in order
    role: str  # "reference" (PyTorch eager fp32), "peer" (other PyTorch modes, plain exports) or "clipdeploy"

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}"

    @property
    def is_torch(self) -> bool:
        return self.backend.startswith("torch")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "towers": list(self.towers)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ContenderSpec:
        return cls(d["backend"], d["precision"], d["device"], tuple(d["towers"]), d["role"])


@dataclass(frozen=True)
class Skipped:
    """A contender (or one tower or case of it) that was not measured, and why."""

    backend: str
    precision: str
    reason: str  # one line: what is missing and how to get it
    tower: str | None = None  # None: every tower
    batch: int | None = None  # None: every batch
    seq_len: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def describe(self) -> str:
        where = " ".join(
            x
            for x in (
                self.tower or "",
                f"batch {self.batch}" if self.batch else "",
                f"length {self.seq_len}" if self.seq_len else "",
            )
            if x
        )
        return f"{self.backend} {self.precision}" + (f" ({where})" if where else "") + f": {self.reason}"


def discover(
    view: ArtifactView,
    *,
    backends: tuple[str, ...],
    towers: tuple[str, ...],
    device: str,
    precisions: tuple[str, ...] | None = None,
) -> tuple[list[ContenderSpec], list[Skipped]]:
    """Contenders for the requested backends, towers and precisions, and what was left out and why.

    ``precisions`` filters the compiled variants only; PyTorch always runs eager fp32 (the
    reference), and on a GPU also fp16 autocast; ``torch.compile`` and, on CPU, plain exports on ONNX
    Runtime and OpenVINO are peers when named.
    """
    known = globals()["backends"]()  # the parameter shadows the function
    for b in backends:
        if b not in known:
            raise UsageError(f"backend {b!r} is not one of {', '.join(known)}; e.g. --backends torch,onnxruntime")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"device {device!r} is not cpu or cuda")
    towers = tuple(t for t in towers if t in view.towers)
    specs: list[ContenderSpec] = []
    skipped: list[Skipped] = []

    if TORCH in backends:
        if not (has_module("torch") and has_module("open_clip")):
            skipped.append(
                Skipped(TORCH, REFERENCE, "PyTorch or open_clip is not installed; pip install 'clipdeploy[export]'")
            )
        else:
            specs.append(ContenderSpec(TORCH, REFERENCE, device, towers, "reference"))
            if device == "cuda":
                specs.append(ContenderSpec(TORCH, AUTOCAST, device, towers, "peer"))
    if COMPILE in backends and has_module("torch") and has_module("open_clip"):
        # torch.compile (default mode) is a peer on CPU too; the harness's warm-up calls compile it untimed.
        specs.append(ContenderSpec(COMPILE, REFERENCE, device, towers, "peer"))
    elif COMPILE in backends:
        skipped.append(Skipped(COMPILE, REFERENCE, "PyTorch or open_clip is not installed; pip install 'clipdeploy[export]'"))

    peers, why = _plain_peers(backends, towers, device)
    specs += peers
    skipped += why

    for backend in registry.names():
        if backend not in backends:
            continue
        found, why = _variant_contenders(view, backend, towers, device, precisions)
        specs += found
        skipped += why
    return specs, skipped


def _plain_peers(
    backends: tuple[str, ...], towers: tuple[str, ...], device: str
) -> tuple[list[ContenderSpec], list[Skipped]]:
    """A plain ``torch.onnx.export`` of the model on each named runtime: what a user gets without clipdeploy."""
    specs, skipped = [], []
    for name, runtime in PLAIN_PEERS.items():
        if name not in backends:
            continue
        reason = None
        if device != "cpu":
            reason = "a CPU peer; on a GPU the peers are PyTorch fp16 autocast and torch.compile"
        elif not (has_module("torch") and has_module("open_clip")):
            reason = "PyTorch or open_clip is not installed (the plain export needs them); pip install 'clipdeploy[export]'"
        else:
            reason = registry.get(runtime).unavailable("cpu")
        if reason:
            skipped.append(Skipped(name, REFERENCE, reason))
        else:
            specs.append(ContenderSpec(name, REFERENCE, device, towers, "peer"))
    return specs, skipped


def _variant_contenders(
    view: ArtifactView,
    backend: str,
    towers: tuple[str, ...],
    device: str,
    precisions: tuple[str, ...] | None,
) -> tuple[list[ContenderSpec], list[Skipped]]:
    spec = registry.get(backend)
    fmt = spec.format
    by_precision: dict[str, dict[str, bool]] = defaultdict(dict)
    for v in view.variants_of(format=fmt):
        if v.tower in towers:
            # Several engines of one precision (one per GPU) are one contender: the runtime picks.
            by_precision[v.precision][v.tower] = by_precision[v.precision].get(v.tower, False) or v.accepted
    wanted = sorted(by_precision) if precisions is None else [p for p in precisions if p in by_precision]
    # A backend that cannot run here is one reason, whatever the artifact holds.
    reason = spec.unavailable(device)
    if reason:
        return [], [Skipped(backend, p, reason) for p in wanted or ["-"]]
    skipped = []
    if precisions is not None:
        make = "clipdeploy quantize" if fmt == "onnx" else "clipdeploy build"
        skipped = [
            Skipped(backend, p, f"the artifact has no {p} {fmt} variant; make one with `{make} DIR --precision {p}`")
            for p in precisions
            if p not in by_precision
        ]
    by_precision = defaultdict(dict, {p: by_precision[p] for p in wanted})
    if not by_precision:
        if precisions is None:
            hint = "`clipdeploy build DIR`" if fmt == "tensorrt" else "`clipdeploy export`"
            skipped.append(Skipped(backend, "-", f"the artifact has no {fmt} variants; make them with {hint}"))
        return [], skipped

    specs = []
    measured = default_precisions(device, backend)
    for precision in sorted(by_precision, key=lambda p: (rank(p), p)):
        tower_ok = by_precision[precision]
        if precisions is None and precision not in measured:
            skipped.append(
                Skipped(
                    backend,
                    precision,
                    f"{precision} is slow on ONNX Runtime {device.upper()} and not what "
                    f"the runtime picks there; pass --precisions {precision} to measure it anyway",
                )
            )
            continue
        run = tuple(t for t in towers if tower_ok.get(t))
        for t in towers:
            if t in tower_ok and not tower_ok[t] and fmt == "onnx":
                skipped.append(
                    Skipped(
                        backend,
                        precision,
                        "the variant did not pass its accuracy gate; re-run `clipdeploy quantize`",
                        tower=t,
                    )
                )
        if fmt != "onnx":
            run = tuple(t for t in towers if t in tower_ok)  # engines: the runtime decides which one loads
        if run:
            specs.append(ContenderSpec(backend, precision, device, run, "clipdeploy"))
    return specs, skipped


# ---- opened contenders (inside the measuring process) ------------------------------------------


class Contender(Protocol):
    """An opened contender: numpy in, numpy out, one call per batch."""

    spec: ContenderSpec
    timer: Timer

    def unsupported(self, tower: str, seq_len: int | None, context_length: int) -> str | None:
        """Why this case cannot run; None when it can."""

    def encode(self, tower: str, x: np.ndarray) -> np.ndarray:
        """Un-normalized embeddings of one batch, as a host float32 array."""

    def describe(self) -> str: ...


@dataclass(frozen=True)
class OpenOptions:
    """Settings every contender opens with."""

    threads: int  # intra-op threads for ONNX Runtime and PyTorch alike; inter-op threads are 1
    graph_optimization_level: str = "all"  # ONNX Runtime graph optimizations
    checkpoint: Path | None = None  # the checkpoint the artifact was exported from, for PyTorch


class RuntimeContender:
    """A compiled variant, run through ``clipdeploy.load`` like any user would."""

    timer: Timer = staticmethod(perf_counter_timer)  # the session returns host arrays: synchronous

    def __init__(self, spec: ContenderSpec, view: ArtifactView, options: OpenOptions) -> None:

        self.spec = spec
        self.dynamic_text = text_is_dynamic(view)
        # A dynamic-length session trims ids to the batch's longest text before it runs them.
        self.trims_text = view.text_is_dynamic
        self.context_length = view.context_length or 0
        # The backend's own settings for the bench's threads and device (ONNX Runtime: threads, providers,
        # graph optimizations); LoadSettings fields, which load() takes by the same names.
        backend = registry.get(spec.backend)
        bench = BenchSettings(spec.device, options.threads, options.graph_optimization_level)
        settings = dict(backend.bench_settings(bench)) if backend.bench_settings else {}
        kwargs = {("backend_options" if k == "extra" else k): v for k, v in settings.items()}
        try:
            self.session = clipdeploy.load(view.root, backend=spec.backend, precision=spec.precision, **kwargs)
        except ArtifactError:
            # load() opens every tower; when only some towers have this precision, open those alone.
            if set(spec.towers) == set(view.towers):
                raise
            self.session = _partial_session(view, spec, settings)

    def unsupported(self, tower: str, seq_len: int | None, context_length: int) -> str | None:
        if tower == "text" and seq_len is not None and seq_len != context_length and not self.dynamic_text:
            return "the artifact's text input has a fixed length"
        return None

    def encode(self, tower: str, x: np.ndarray) -> np.ndarray:
        if tower == "image":
            return self.session.encode_pixels(x, normalize=False)
        if self.trims_text and x.shape[1] == self.context_length:
            # Full length on a dynamic-length artifact: the session would trim these padded ids to the
            # prompt length, so run all columns on the runner, as a batch whose longest text fills the
            # context would. The embeddings are the same (a causal tower ignores what follows the end).
            return self._run_runner("text", x)
        return self.session.encode_tokens(x, normalize=False)

    def _run_runner(self, tower: str, x: np.ndarray) -> np.ndarray:
        runner = self.session.runners[tower]
        (spec,) = runner.inputs
        (out,) = runner.outputs
        runner.check_feed({spec.name: x})
        step = runner.max_batch or len(x)
        parts = [runner.infer({spec.name: x[i : i + step]})[out.name] for i in range(0, len(x), step)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def describe(self) -> str:
        return self.session.describe()


def _partial_session(view: ArtifactView, spec: ContenderSpec, settings: dict[str, Any]) -> ClipSession:
    """A session of ``spec.towers`` alone, opened by the contender's backend as ``load()`` opens every tower."""
    fields = {k: tuple(v) if k == "providers" else v for k, v in settings.items()}
    chosen, runners = registry.get(spec.backend).load(view.with_towers(spec.towers), spec.precision,
                                                      LoadSettings(**fields), True)
    return ClipSession(view, runners, chosen, spec.backend)


class TorchContender:
    """The open_clip model under ``torch.inference_mode``: eager fp32, fp16 autocast or ``torch.compile``."""

    def __init__(self, spec: ContenderSpec, view: ArtifactView, options: OpenOptions) -> None:
        torch = require("torch", "export")

        self.spec = spec
        self._torch = torch
        torch.set_num_threads(options.threads)
        self.device = torch.device(spec.device)
        self.model = build_reference_model(view.model, options.checkpoint).to(self.device)
        self._context_length = view.context_length
        prefix, self.prefix_reason = prefix_text_encoder(self.model)
        fns = {"image": self.model.encode_image, "text": self.model.encode_text, "text-prefix": prefix}
        if spec.backend == "torch.compile":
            fns = {k: (torch.compile(f, dynamic=False) if f is not None else None) for k, f in fns.items()}
        self._fns = fns
        self._autocast = spec.precision == "fp16-autocast"
        self.timer = cuda_event_timer(torch) if self.device.type == "cuda" else perf_counter_timer

    def unsupported(self, tower: str, seq_len: int | None, context_length: int) -> str | None:
        if tower == "text" and seq_len is not None and seq_len != context_length and self._fns["text-prefix"] is None:
            return f"open_clip's encode_text takes only full-length ids, and {self.prefix_reason}"
        return None

    def encode(self, tower: str, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        fn = self._fns[tower]
        if tower == "text" and x.shape[1] != self._context_length:
            fn = self._fns["text-prefix"]
        t = torch.from_numpy(x).to(self.device)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self._autocast):
            y = fn(t)
        return y.float().cpu().numpy()

    def describe(self) -> str:
        return f"open_clip {type(self.model).__name__} on {self.device} ({self.spec.backend} {self.spec.precision})"


def open_contender(spec: ContenderSpec, view: ArtifactView, options: OpenOptions) -> Contender:
    if spec.backend in PLAIN_PEERS:
        return PlainExportContender(spec, view, options)
    if spec.is_torch:
        return TorchContender(spec, view, options)
    return RuntimeContender(spec, view, options)
