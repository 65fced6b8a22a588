"""The precision registry: every precision clipdeploy knows, and everything the stages need to know about it.

A precision is one ``PrecisionSpec`` registered here; every other module asks this registry (its
name, how its variant is made, its accuracy-gate defaults, its engine-validation tolerance, which
backends run it and with which settings, where it ranks when a backend picks for itself, and which
file its variant runs). Adding a precision is one ``register(PrecisionSpec(...))`` call plus its make
step (a ``clipdeploy.quantize.make.MakeStep``); no other table needs an edit.

Light on purpose (stdlib only): the manifest schema and the runtime import it. A make step is named
by an entry point (``"module:function"``) and imported only when a variant is made.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from clipdeploy import cpu_features
from clipdeploy.errors import UsageError

__all__ = [
    "PrecisionSpec", "register", "unregister", "get", "names", "quantized", "for_backend", "preference",
    "by_default", "rank", "view", "allow", "disallow", "cpu_refusal", "REFERENCE", "FP32", "FP16", "INT8",
    "INT8_FP16", "FP8", "BF16", "EXPORT",
]

EXPORT = "export"  # the make step of the reference precision: `clipdeploy export` writes it


@dataclass(frozen=True)
class PrecisionSpec:
    """One precision and what each stage needs to know about it."""

    name: str
    make: str  # EXPORT, or "module:function", a quantize.make.MakeStep that makes one tower's variant
    gate: Mapping[str, float | None] = field(default_factory=dict)  # GateThresholds defaults; {} for the reference
    engine_tolerance: Mapping[str, float | None] = field(default_factory=dict)  # EngineTolerance vs the ONNX variant
    backends: tuple[str, ...] = ("onnxruntime", "tensorrt")  # backends that run its variants
    # Where it ranks when a backend target ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt", ...) picks
    # for itself, lower first; a target not listed never picks it unasked.
    preference: Mapping[str, int] = field(default_factory=dict)
    slow_on: tuple[str, ...] = ()  # targets where it runs emulated: benchmarks measure it only when asked
    calibrated: bool = False  # made from int8 calibration: takes --method, and recovery can rescue it
    min_compute_capability: tuple[int, int] | None = None  # CUDA GPUs older than this cannot run its engines
    # CPU flags (/proc/cpuinfo names) of which it needs at least one; recorded on its variants as requires_cpu.
    cpu_features: tuple[str, ...] = ()
    # None: its variant is a file of its own. A precision's name: its variant runs that precision's file
    # with a backend setting (``backend_settings``), as bf16 runs the fp32 file; then only its ``backends``
    # may open it, since any other would run that file and call it this precision.
    runs_file_of: str | None = None
    # backend -> the settings that backend applies when it runs this precision's variants, e.g.
    # {"openvino": {"INFERENCE_PRECISION_HINT": "bf16"}}; a backend that needs a setting per precision
    # (OpenVINO) runs only the precisions that give it one.
    backend_settings: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    gate_backend: str = "onnxruntime"  # the backend its accuracy gate runs the variant on
    instead: str = ""  # what to use where it cannot run, for the one-line refusal
    # (module, extra) its make step and its gate import: `quantize` imports each before it reads any data,
    # so a missing package is one line at once, not after minutes of calibration.
    needs: tuple[tuple[str, str], ...] = ()
    summary: str = ""  # one line for `clipdeploy quantize --precision`'s help

    def make_step(self) -> Callable[..., Any]:
        """The function that builds this precision's variant, imported now (it may pull in onnx)."""
        if self.make == EXPORT:
            raise UsageError(f"{self.name} variants are written by `clipdeploy export`, not made from another variant")
        module, _, attr = self.make.partition(":")
        return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


_REGISTRY: dict[str, PrecisionSpec] = {}


def register(spec: PrecisionSpec, *, replace: bool = False) -> PrecisionSpec:
    """Add ``spec``; registration order is display order (reports, choices). Returns it, for decorator-free use."""
    if spec.name in _REGISTRY and not replace:
        raise UsageError(f"precision {spec.name!r} is already registered; pass replace=True to redefine it")
    if ":" not in spec.make and spec.make != EXPORT:
        raise UsageError(f"precision {spec.name!r}: make={spec.make!r} must be 'module:function' or {EXPORT!r}")
    if spec.runs_file_of is not None and (spec.runs_file_of == spec.name or spec.runs_file_of not in _REGISTRY):
        raise UsageError(f"precision {spec.name!r}: runs_file_of={spec.runs_file_of!r} must name another registered "
                         f"precision ({', '.join(_REGISTRY)}); register that one first")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a precision (tests and plugins that register their own)."""
    _REGISTRY.pop(name, None)


def allow(backend: str, ranks: Mapping[str, int | None], targets: tuple[str, ...] = ()) -> None:
    """Let a new ``backend`` run registered precisions, so that adding it edits no spec here.

    ``ranks``: precision -> its place in the preference order of each of ``targets`` (lower first),
    or None to run it only when asked for by name.
    """
    for name, r in ranks.items():
        spec = get(name)
        preference = {**spec.preference, **({t: r for t in targets} if r is not None else {})}
        backends = tuple(dict.fromkeys((*spec.backends, backend)))
        _REGISTRY[name] = replace(spec, backends=backends, preference=preference)


def disallow(backend: str, targets: tuple[str, ...] = ()) -> None:
    """Undo ``allow`` (a backend going away): no precision lists ``backend`` or ranks on ``targets`` after it."""
    for name, spec in list(_REGISTRY.items()):
        preference = {t: r for t, r in spec.preference.items() if t not in targets}
        backends = tuple(b for b in spec.backends if b != backend)
        _REGISTRY[name] = replace(spec, backends=backends, preference=preference)


def get(name: str) -> PrecisionSpec:
    """The spec of ``name``; an unknown name is a UsageError that suggests the closest known one."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(f"precision {name!r} is not one of {', '.join(_REGISTRY)}; {hint}pick one of those") from None


def cpu_refusal(name: str) -> str | None:
    """Why ``name`` cannot run on this CPU, in one line naming the alternative; None when it can."""
    spec = get(name)
    lacking = cpu_features.missing(spec.cpu_features)
    if lacking is None:
        return None
    instead = f"; use {spec.instead} instead" if spec.instead else ""
    return f"precision {name!r} needs a CPU with {lacking}, which this one lacks{instead}"


def names() -> tuple[str, ...]:
    """Every registered precision, in registration order."""
    return tuple(_REGISTRY)


def gate_defaults(key: str) -> str:
    """Each quantized precision's default for one gate threshold, in words ("0.95 for int8, int8-fp16")."""
    by_value: dict[float, list[str]] = {}
    for name in quantized():
        value = _REGISTRY[name].gate.get(key)
        if value is not None:
            by_value.setdefault(value, []).append(name)
    return "; ".join(f"{v:g} for {', '.join(names)}" for v, names in by_value.items()) or "none"


def quantized() -> tuple[str, ...]:
    """The precisions `clipdeploy quantize` makes (all but the exported reference)."""
    return tuple(n for n, s in _REGISTRY.items() if s.make != EXPORT)


def quantized_help() -> str:
    """`--precision`'s help: each quantized precision with its summary ("int8: Q/DQ with fp32 elsewhere ...")."""
    return "; ".join(f"{n}: {_REGISTRY[n].summary}" if _REGISTRY[n].summary else n for n in quantized())


def for_backend(backend: str) -> tuple[str, ...]:
    """The precisions ``backend`` runs."""
    return tuple(n for n, s in _REGISTRY.items() if backend in s.backends)


def preference(target: str) -> tuple[str, ...]:
    """What ``target`` (e.g. "onnxruntime-cpu") picks for ``precision=None``: fastest first."""
    ranked = [(s.preference[target], i, n) for i, (n, s) in enumerate(_REGISTRY.items()) if target in s.preference]
    return tuple(n for _, _, n in sorted(ranked))


def by_default(backend: str, target: str) -> tuple[str, ...]:
    """What a benchmark measures on ``target`` unasked: what ``backend`` runs, less what is emulated there."""
    return tuple(n for n in for_backend(backend) if target not in _REGISTRY[n].slow_on)


def rank(name: str) -> int:
    """Display position (registration order); unknown names sort last."""
    order = list(_REGISTRY)
    return order.index(name) if name in order else len(order)


V = TypeVar("V")


class _View(Mapping[str, V]):
    # A live read-only mapping: a precision registered later shows up without a rebuilt table.
    def __init__(self, value: Callable[[PrecisionSpec], V], which: Callable[[], tuple[str, ...]]) -> None:
        self._value, self._which = value, which

    def __getitem__(self, name: str) -> V:
        if name not in self._which():
            get(name)  # the one-line error with a suggestion
            raise KeyError(name)  # registered, but not in this view (e.g. the reference has no gate)
        return self._value(_REGISTRY[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._which())

    def __len__(self) -> int:
        return len(self._which())


def view(value: Callable[[PrecisionSpec], V], which: Callable[[], tuple[str, ...]] = names) -> Mapping[str, V]:
    """A live ``name -> value(spec)`` mapping over ``which()`` names, for modules that keep a table's shape."""
    return _View(value, which)


# ---- the built-in precisions ------------------------------------------------------------------------------

_MAKE = "clipdeploy.quantize"  # each built-in make step is `make` in its precision's module there
_INT8_GATE = {"min_cosine": 0.95, "min_mean_cosine": 0.99, "min_top1": 0.95}
# OpenVINO's INFERENCE_PRECISION_HINT for each precision it runs. Set explicitly: on CPUs with AVX512_BF16 or
# AMX, OpenVINO's default runs fp32 (and the float parts of int8) files in bf16, which would make the
# fp32/int8 accuracy gates untrue there. int8 Q/DQ still runs its int8 kernels under f32.
_OPENVINO_F32 = {"openvino": {"INFERENCE_PRECISION_HINT": "f32"}}
# What the graph-editing make steps import (quantize/graph.py, fp16.py, int8.py).
_GRAPH = (("onnx", "export"), ("onnx_ir", "export"))
_FP16_PASS = (("onnxruntime.transformers.float16", "cpu"),)
_CALIBRATE = (("onnxruntime.quantization", "cpu"),)

FP32 = REFERENCE = register(PrecisionSpec(
    "fp32", EXPORT,
    engine_tolerance={"min_cosine": 0.9999, "max_abs_rel": 1e-2},
    preference={"onnxruntime-cpu": 1, "onnxruntime-cuda": 1, "tensorrt": 2},
    backend_settings=_OPENVINO_F32,
)).name
FP16 = register(PrecisionSpec(
    "fp16", f"{_MAKE}.fp16:make",
    gate={"min_cosine": 0.999},
    engine_tolerance={"min_cosine": 0.999, "max_abs_rel": 5e-2},
    preference={"onnxruntime-cuda": 0, "tensorrt": 1},
    slow_on=("onnxruntime-cpu",),  # no fp16 kernels on CPU: emulated, slower than fp32
    needs=_GRAPH + _FP16_PASS,
    summary="LayerNorm and out-of-range nodes in fp32, the rest in fp16 (best on GPUs)",
)).name
# The per-sample floor catches the image a good mean hides (mean 0.996 with one sample at 0.76).
INT8 = register(PrecisionSpec(
    "int8", f"{_MAKE}.int8:make",
    gate=_INT8_GATE,
    engine_tolerance={"min_cosine": 0.99, "max_abs_rel": None},
    preference={"onnxruntime-cpu": 0},
    calibrated=True,
    needs=_GRAPH + _CALIBRATE,
    backend_settings=_OPENVINO_F32,
    summary="Q/DQ with fp32 elsewhere (best on ONNX Runtime CPU)",
)).name
INT8_FP16 = register(PrecisionSpec(
    "int8-fp16", f"{_MAKE}.int8:make_int8_fp16",
    gate=_INT8_GATE,
    engine_tolerance={"min_cosine": 0.99, "max_abs_rel": None},
    preference={"tensorrt": 0},
    slow_on=("onnxruntime-cpu",),
    calibrated=True,
    needs=_GRAPH + _CALIBRATE + _FP16_PASS,
    summary="Q/DQ with fp16 elsewhere (best on TensorRT)",
)).name
# FLOAT8E4M3FN Q/DQ, fp16 elsewhere: TensorRT on compute capability 8.9+ (Ada, Hopper, Blackwell) only;
# ONNX Runtime's CPU provider runs it emulated, which is what the gate measures.
FP8 = register(PrecisionSpec(
    "fp8", f"{_MAKE}.fp8:make",
    gate={"min_cosine": 0.97, "min_mean_cosine": 0.995, "min_top1": 0.97},
    engine_tolerance={"min_cosine": 0.99, "max_abs_rel": None},
    slow_on=("onnxruntime-cpu",),
    calibrated=True,
    min_compute_capability=(8, 9),
    needs=_GRAPH + _CALIBRATE + _FP16_PASS + (("ml_dtypes", "export"),),
    summary="FLOAT8E4M3FN Q/DQ with fp16 elsewhere (TensorRT on compute capability 8.9+)",
)).name
# OpenVINO running the fp32 file with INFERENCE_PRECISION_HINT=bf16 (its default on such CPUs): no file of
# its own, gated like fp16 against fp32 on held-out data, and only on a CPU that computes bf16 natively
# (elsewhere OpenVINO would emulate it, slower than fp32). The openvino backend ranks it (runtime/backends/openvino.py).
BF16 = register(PrecisionSpec(
    "bf16", f"{_MAKE}.bf16:make",
    gate={"min_cosine": 0.999},
    engine_tolerance={"min_cosine": 0.999, "max_abs_rel": 5e-2},
    backends=(),
    cpu_features=cpu_features.BF16_FLAGS,
    runs_file_of=REFERENCE,
    backend_settings={"openvino": {"INFERENCE_PRECISION_HINT": "bf16"}},
    gate_backend="openvino",
    instead="precision='fp32', or int8 (clipdeploy quantize --precision int8)",
    needs=(("openvino", "openvino"),),  # its gate runs OpenVINO
    summary="OpenVINO runs the fp32 file in bf16 (CPUs with AVX512_BF16 or AMX only)",
)).name
