"""The backend registry: the mechanism every runtime backend plugs into.

Each backend declares its own ``BackendSpec`` in its module (``runtime/backends/<name>.py``) and calls
``register``; the package's ``__init__`` imports those modules, so importing this registry registers the
built-in backends, in a fixed order. ``load(backend=...)`` validates against the registry and resolves
``"auto"`` through it; the CLI's ``--backend`` choices, the benchmark's contenders, its settings and its
report order, and which backends need a GPU all come from it. Adding a backend is one module with a
runner and one ``register(BackendSpec(...))`` call.

Light: availability checks use ``importlib.util.find_spec``; ``onnxruntime``, ``openvino`` and
``tensorrt`` are imported only when a runner is opened.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipdeploy import cpu_features, precisions
from clipdeploy.artifact.external_data import check_variant_external_data
from clipdeploy.artifact.manifest import Variant, variant_files, variants, verify_files
from clipdeploy.artifact.view import ArtifactView
from clipdeploy.errors import ArtifactError, UsageError
from clipdeploy.runtime.backends.base import Runner

__all__ = [
    "BackendSpec", "LoadSettings", "BenchSettings", "Runs", "register", "unregister", "get", "names", "choices",
    "has_module", "select_variant", "AUTO", "auto_order", "check_settings", "needs_gpu", "open_onnx_files",
    "first_provider", "variants_in", "open_file",
]

AUTO = "auto"


@dataclass(frozen=True)
class LoadSettings:
    """The backend settings ``load()`` takes; each backend reads those it understands."""

    providers: tuple[Any, ...] = ("CPUExecutionProvider",)  # ONNX Runtime
    intra_op_num_threads: int | None = None
    inter_op_num_threads: int | None = None
    graph_optimization_level: str = "all"
    device: int = 0  # TensorRT
    cuda_graphs: bool = False
    engine_host_code_allowed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # for registered backends


@dataclass(frozen=True)
class BenchSettings:
    """What the benchmark gives every contender, for a backend's ``bench_settings`` hook to translate."""

    device: str  # "cpu" or "cuda"
    threads: int  # intra-op threads every contender gets (inter-op: 1)
    graph_optimization_level: str = "all"  # one of disable, basic, extended, all


@dataclass(frozen=True)
class Runs:
    """How a backend runs one registered precision: its preference rank, and a CPU rule where it has one."""

    rank: int | None  # place in the backend's preference (lower first); None: only when asked for by name
    # CPU flags (/proc/cpuinfo names) of which this backend needs one to run the precision here: without
    # them it is passed over when picking, and refused (``refusal``) when asked for by name...
    cpu_features: tuple[str, ...] = ()
    refusal: str = ""
    # ...unless this backend_options key (one of the spec's ``options``) is set: run it anyway.
    anyway_option: str | None = None

    def cpu_refusal(self, settings: LoadSettings) -> str | None:
        """The one-line refusal when the CPU rule stops it here; None when it runs."""
        if not self.cpu_features or cpu_features.missing(self.cpu_features) is None:
            return None
        if self.anyway_option is not None and settings.extra.get(self.anyway_option):
            return None
        return self.refusal or f"needs a CPU with one of {', '.join(sorted(self.cpu_features))}"


Opened = tuple[dict[str, Variant], dict[str, Runner]]


@dataclass(frozen=True)
class BackendSpec:
    """One runtime backend, declared in its own module."""

    name: str
    format: str  # the manifest variant format it runs ("onnx", "tensorrt")
    devices: tuple[str, ...]  # device kinds it can run on: "cpu", "cuda"
    # Runners for every tower of the view: (view, precision or None, settings, verify) -> (variants, runners).
    open: Callable[[ArtifactView, str | None, LoadSettings, bool], Opened]
    # Why it cannot run on device kind ("cpu"/"cuda") here, cheaply (no heavy import); None when it can.
    unavailable: Callable[[str], str | None]
    # The precision-preference target for these settings (see PrecisionSpec.preference).
    target: Callable[[LoadSettings], str]
    # For backend="auto": why this artifact should not use it here (None: use it). None: never chosen by auto.
    auto: Callable[[ArtifactView, str | None, LoadSettings], str | None] | None = None
    auto_rank: int = 50  # auto tries backends lowest rank first (ties: registration order)
    bench_target: Callable[[str], str] | None = None  # device kind -> target, for benchmark defaults
    # The settings the benchmark opens it with, as LoadSettings fields (load() takes them by the same names,
    # ``extra`` as backend_options): threads, providers, graph optimizations. None: load()'s defaults.
    bench_settings: Callable[[BenchSettings], Mapping[str, Any]] | None = None
    # Registered precisions it runs, declared here rather than in each PrecisionSpec: name -> preference
    # rank on its ``targets`` (None: only when asked for), or a ``Runs`` entry with a CPU rule. See precisions.allow.
    runs: Mapping[str, int | None | Runs] = field(default_factory=dict)
    targets: tuple[str, ...] = ()  # the preference targets ``target`` returns
    # Refuses settings it would refuse when opened (a bad value), cheaply: load() asks every backend before
    # choosing one, so a bad option is refused whichever backend runs, not only when its backend does.
    check: Callable[[LoadSettings], object] | None = None
    options: tuple[str, ...] = ()  # the LoadSettings.extra keys (load's backend_options) it reads
    # One ONNX file run as a variant of a precision, for a one-off check such as quantize's gate (no
    # compiled-model cache): (path, precision, settings) -> runner. None: it cannot run a lone ONNX file.
    open_file: Callable[[Path, str, LoadSettings], Runner] | None = None

    def precisions(self) -> tuple[str, ...]:
        return precisions.for_backend(self.name)

    def runs_entry(self, precision: str) -> Runs:
        """How it runs ``precision``; a precision that runs another's file (``runs_file_of``) without an
        entry of its own inherits that file's entry: its CPU rule is about the file's kernels."""
        entry = self.runs.get(precision)
        if entry is None and precision in precisions.names():
            source = precisions.get(precision).runs_file_of
            if source is not None and source in self.runs:
                entry = self.runs[source]
        return entry if isinstance(entry, Runs) else Runs(entry)

    def preference(self, settings: LoadSettings) -> tuple[str, ...]:
        """What it picks for ``precision=None`` with these settings, fastest first; what its CPU rules stop here
        is passed over."""
        return tuple(
            p for p in precisions.preference(self.target(settings))
            if p in self.precisions() and self.runs_entry(p).cpu_refusal(settings) is None
        )

    def refusal(self, precision: str | None, settings: LoadSettings) -> str | None:
        """Why it will not run ``precision`` (named) here; None when it will, or when none was named."""
        return None if precision is None else self.runs_entry(precision).cpu_refusal(settings)

    def load(self, view: ArtifactView, precision: str | None, settings: LoadSettings, verify: bool) -> Opened:
        """Its runners for every tower of ``view``, after the rules its ``runs`` entries declare."""
        reason = self.refusal(precision, settings)
        if reason is not None:
            raise UsageError(reason)
        return self.open(view, precision, settings, verify)


_REGISTRY: dict[str, BackendSpec] = {}


def register(spec: BackendSpec, *, replace: bool = False) -> BackendSpec:
    """Add a backend; registration order is the order of ``--backend`` choices and of the bench report."""
    if spec.name in _REGISTRY and not replace:
        raise UsageError(f"backend {spec.name!r} is already registered; pass replace=True to redefine it")
    if spec.name == AUTO:
        raise UsageError(f"{AUTO!r} is reserved: it means 'pick a backend'; name the backend something else")
    _REGISTRY[spec.name] = spec
    if spec.runs:
        precisions.allow(spec.name, {p: spec.runs_entry(p).rank for p in spec.runs}, spec.targets)
    return spec


def unregister(name: str) -> None:
    """Remove a backend; no precision lists it afterwards."""
    spec = _REGISTRY.pop(name, None)
    if spec is not None:
        precisions.disallow(name, spec.targets)


def get(name: str) -> BackendSpec:
    if name not in _REGISTRY:
        raise UsageError(f"backend {name!r} is not one of {', '.join(choices())}")
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    """Registered backends, in registration order."""
    return tuple(_REGISTRY)


def auto_order() -> tuple[str, ...]:
    """The order ``backend="auto"`` tries them: by ``auto_rank``, then registration order."""
    return tuple(sorted(_REGISTRY, key=lambda n: _REGISTRY[n].auto_rank))


def choices() -> tuple[str, ...]:
    """What ``load(backend=...)`` and ``--backend`` accept."""
    return (AUTO, *_REGISTRY)


def needs_gpu() -> tuple[str, ...]:
    """The backends that run on a GPU only (no "cpu" among their devices): a scheduler gives them one."""
    return tuple(n for n, s in _REGISTRY.items() if "cpu" not in s.devices)


def check_settings(settings: LoadSettings) -> None:
    """Refuse a setting no backend takes: a bad value for any backend, or a backend_options key none reads."""
    for spec in _REGISTRY.values():
        if spec.check is not None:
            spec.check(settings)
    known = sorted({key for spec in _REGISTRY.values() for key in spec.options})
    for key in settings.extra:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known) or 'none'}"
            raise UsageError(f"backend_options key {key!r} is not read by any backend ({hint})")


def open_file(backend: str, path: Path, precision: str, settings: LoadSettings) -> Runner:
    """A runner on the ONNX file ``path``, run by ``backend`` as it runs ``precision`` variants (the
    precision's backend settings included), uncached: what quantize's gate judges is what serving runs."""
    spec = get(backend)
    if spec.open_file is None:
        raise UsageError(f"backend {backend!r} cannot run a lone ONNX file; gate on one of "
                         f"{', '.join(n for n, s in _REGISTRY.items() if s.open_file is not None)}")
    return spec.open_file(path, precision, settings)


def has_module(name: str) -> bool:
    """Whether ``name`` is importable, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def first_provider(settings: LoadSettings) -> str:
    """The name of the first ONNX Runtime execution provider asked for (a provider may be a (name, options) pair)."""
    providers = settings.providers or ("CPUExecutionProvider",)
    return providers[0] if isinstance(providers[0], str) else providers[0][0]


def variants_in(manifest: ArtifactView | Mapping[str, Any]) -> Sequence[Variant]:
    """The variants of a view, or of a manifest dict (for callers that read one themselves)."""
    return manifest.variants if isinstance(manifest, ArtifactView) else variants(dict(manifest))


def select_variant(
    manifest: ArtifactView | Mapping[str, Any], tower: str, fmt: str, precision: str | None, preference: Sequence[str]
) -> Variant:
    """The ``fmt`` variant of ``tower`` to run: ``precision`` when named, else the first accepted in ``preference``."""
    candidates = [v for v in variants_in(manifest) if v.tower == tower and v.format == fmt]
    if precision is not None:
        precisions.get(precision)  # an unknown name: one line with a suggestion
        for v in candidates:
            if v.precision == precision:
                if not v.accepted:
                    raise ArtifactError(
                        f"the {precision} {tower} variant did not pass its accuracy gate; "
                        "re-run `clipdeploy quantize` or choose another precision"
                    )
                lacking = cpu_features.missing(v.extra.get("requires_cpu") or ())
                if lacking is not None:
                    raise UsageError(
                        f"the {precision} {tower} variant needs a CPU with {lacking}, which this one lacks; "
                        "choose another precision"
                    )
                return v
        have = sorted({v.precision for v in candidates}) or ["none"]
        raise ArtifactError(
            f"no {precision} {fmt} variant of the {tower} tower (have: {', '.join(have)}); "
            f"make one with `clipdeploy quantize --precision {precision}`"
        )
    for want in preference:
        for v in candidates:
            # A variant made on another machine may need a CPU feature this one lacks: pass over it.
            if v.precision == want and v.accepted and cpu_features.missing(v.extra.get("requires_cpu") or ()) is None:
                return v
    raise ArtifactError(
        f"no accepted {fmt} variant of the {tower} tower; re-export the model with `clipdeploy export --force`"
    )


def open_onnx_files(
    view: ArtifactView,
    precision: str | None,
    preference: Sequence[str],
    verify: bool,
    make_runner: Callable[[Path, Variant], Runner],
) -> Opened:
    """Pick, check and open each tower's ONNX variant; for any backend that runs ONNX files.

    ``make_runner(path, variant)``: the runner may depend on the variant's precision, not only its file
    (two variants may share one file, e.g. fp32 and bf16)."""
    chosen: dict[str, Variant] = {}
    runners: dict[str, Runner] = {}
    for tower in view.towers:
        variant = select_variant(view, tower, "onnx", precision, preference)
        if verify:
            verify_files(view.root, variant_files(variant))
        check_variant_external_data(view.root, variant.file, variant.external_data)
        runners[tower] = make_runner(view.root / variant.file, variant)
        chosen[tower] = variant
    return chosen, runners
