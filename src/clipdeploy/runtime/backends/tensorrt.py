"""TensorRT backend: pick the engine that fits this GPU and TensorRT, and run it from a thin CUDA runtime.

Each engine is deserialized once and shared. Each thread gets its own execution contexts, stream,
buffers and CUDA graphs, so a session can be called from many threads at once. ``tensorrt`` and
``cuda-python`` are imported only when an engine is loaded.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy import precisions
from clipdeploy.deps import require
from clipdeploy.errors import ArtifactError, ClipDeployError, EngineError, InputError, UsageError
from clipdeploy.artifact.manifest import Variant, variant_files, verify_files
from clipdeploy.artifact.view import ArtifactView
from clipdeploy.runtime import cuda
from clipdeploy.runtime.backends import registry
from clipdeploy.runtime.backends.base import IOSpec, Runner
from clipdeploy.runtime.backends.registry import BackendSpec, LoadSettings, variants_in
from clipdeploy.runtime.tensorrt_compat import base_version, engine_mismatch, get_logger, import_tensorrt

log = logging.getLogger(__name__)


# ---- choosing an engine -------------------------------------------------------------------------


def _engines(manifest: ArtifactView | dict[str, Any], tower: str, precision: str | None) -> list[Variant]:
    if precision is not None:
        precisions.get(precision)  # an unknown name: one line with a suggestion
    return [
        v
        for v in variants_in(manifest)
        if v.tower == tower and v.format == "tensorrt" and (precision is None or v.precision == precision)
    ]


def _no_engine(tower: str, precision: str | None) -> ArtifactError:
    what = f"{precision} " if precision else ""
    return ArtifactError(
        f"no {what}TensorRT engine of the {tower} tower in this artifact; build one with "
        f"`clipdeploy build DIR --precision {precision or precisions.FP16}`"
    )


def host_code_refusal(file: str) -> EngineError:
    return EngineError(
        f"{file} is version-compatible, so it embeds TensorRT's lean runtime: host code that would run in this "
        "process. Load it only if you trust the file: pass engine_host_code_allowed=True (CLI: --allow-host-code), "
        "or rebuild without --version-compat"
    )


def select_engine(
    manifest: ArtifactView | dict[str, Any],
    tower: str,
    precision: str | None,
    gpu: cuda.GpuInfo,
    version: str,
    preference: Sequence[str],
    host_code_allowed: bool = False,
) -> Variant:
    """The engine of ``tower`` to run here: it fits this GPU and TensorRT and passed its validation."""
    engines = _engines(manifest, tower, precision)
    if not engines:
        raise _no_engine(tower, precision)
    fitting = [v for v in engines if engine_mismatch(v.extra, gpu, version) is None]
    if not fitting:
        v = engines[0]
        raise EngineError(
            f"the {v.precision} {tower} engine {v.file} was built for {engine_mismatch(v.extra, gpu, version)}: "
            f"rebuild it here with `clipdeploy build DIR --precision {v.precision}`, or build with "
            "--hardware-compat ampere-plus / --version-compat to carry engines between GPUs or TensorRT versions"
        )
    if not host_code_allowed:
        safe = [v for v in fitting if not v.extra.get("version_compatible")]
        if not safe:
            raise host_code_refusal(fitting[0].file)
        fitting = safe
    # Engines tied to this exact GPU and version are the fastest; portable ones come after.
    fitting.sort(
        key=lambda v: (v.extra.get("hardware_compatibility", "none") != "none", bool(v.extra.get("version_compatible")))
    )
    for want in [precision] if precision else preference:
        for v in fitting:
            if v.precision == want and v.accepted:
                return v
    v = fitting[0]
    if precision is None and not any(f.precision in preference for f in fitting):
        raise ArtifactError(
            f"the {tower} engines here are {', '.join(sorted({f.precision for f in fitting}))}, none of "
            f"{', '.join(preference)}; pass precision= to choose one"
        )
    state = "failed its accuracy check against its ONNX source" if v.validation else "has not been validated"
    raise ArtifactError(
        f"the {v.precision} {tower} engine {v.file} {state}; run `clipdeploy validate DIR` on this GPU, or rebuild it"
    )


# ---- the runner ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrtOptions:
    """TensorRT runtime settings. CLI and API both resolve through this."""

    device: int = 0  # CUDA device ordinal the engines run on
    cuda_graphs: bool = False  # capture one CUDA graph per batch bucket (padded to a power of two) and replay it
    engine_host_code_allowed: bool = False  # allow plans that embed host code (version-compatible engines)

    def __post_init__(self) -> None:
        if not isinstance(self.device, int) or self.device < 0:
            raise UsageError(f"device={self.device!r} must be a CUDA device number, 0 or more")


def _nbytes(dtype: np.dtype, shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _buckets(max_batch: int) -> list[int]:
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return [*sizes, max_batch]


class _ThreadState:
    """One thread's contexts, stream, event, static buffers and graphs. Never shared."""

    def __init__(self, runner: TrtRunner) -> None:
        self.r = runner
        cuda.set_device(runner.device)
        self.stream = cuda.Stream()
        self.event = cuda.Event()
        size = int(runner.engine.device_memory_size_v2)
        self.scratch = cuda.DeviceBuffer(size)
        self.contexts: dict[Any, Any] = {}
        self.graphs: dict[Any, cuda.Graph | None] = {}
        ctx = self.context(None)
        # Static buffers, big enough for the profile's largest shapes.
        largest = {spec.name: runner.profiles[spec.name][2] for spec in runner.inputs}
        self._set_shapes(ctx, largest)
        shapes = {**largest, **{spec.name: tuple(ctx.get_tensor_shape(spec.name)) for spec in runner.outputs}}
        self.dev_bufs = {s.name: cuda.DeviceBuffer(_nbytes(s.dtype, shapes[s.name])) for s in runner.io}
        self.host_bufs = {s.name: cuda.HostBuffer(_nbytes(s.dtype, shapes[s.name])) for s in runner.io}
        self._set_addresses(ctx)
        self.shapes: Any = None  # the input shapes the default context has now
        self.direct = False  # the default context points at a caller's torch tensors, not the static buffers

    def context(self, key: Any) -> Any:
        """The default context (key None), or the one whose shapes and graph belong to one input-shape key."""
        if key not in self.contexts:
            trt = self.r.trt
            ctx = self.r.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if ctx is None:
                raise EngineError(
                    f"TensorRT could not create an execution context for {self.r.path.name} ({self.r.log_tail()})"
                )
            # Contexts of one thread run one at a time on one stream, so they share one scratch area.
            ctx.set_device_memory(self.scratch.ptr, self.scratch.nbytes)
            if key is not None:
                self._set_shapes(ctx, dict(key))
                self._set_addresses(ctx)
            self.contexts[key] = ctx
        return self.contexts[key]

    def _set_shapes(self, ctx: Any, shapes: dict[str, tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            if not ctx.set_input_shape(name, tuple(int(d) for d in shape)):
                raise InputError(f"TensorRT refused shape {list(shape)} for input {name!r} ({self.r.log_tail()})")

    def _set_addresses(self, ctx: Any) -> None:
        for name, buf in self.dev_bufs.items():
            ctx.set_tensor_address(name, buf.ptr)

    def enqueue(self, ctx: Any) -> None:
        if not ctx.execute_async_v3(self.stream.handle):
            raise EngineError(f"TensorRT could not run {self.r.path.name} ({self.r.log_tail()})")

    def default_context(self, key: Any) -> Any:
        """The default context, with input shapes ``key`` set."""
        ctx = self.context(None)
        if self.shapes != key:
            self._set_shapes(ctx, dict(key))
            self.shapes = key
        return ctx

    def run(self, key: Any) -> Any:
        """Enqueue the engine for input shapes ``key``, through a CUDA graph when enabled; returns the context."""
        if not self.r.cuda_graphs:
            ctx = self.default_context(key)
            if self.direct:
                self._set_addresses(ctx)
                self.direct = False
            self.enqueue(ctx)
            return ctx
        ctx = self.context(key)
        if key not in self.graphs:
            self.enqueue(ctx)  # the first run after setting shapes does work a graph cannot capture
            try:
                self.graphs[key] = cuda.Graph(self.stream, lambda: self.enqueue(ctx))
            except EngineError as e:
                log.warning(
                    "clipdeploy: CUDA graph capture failed for %s at %s, running without: %s", self.r.path.name, key, e
                )
                self.graphs[key] = None
            return ctx
        graph = self.graphs[key]
        if graph is None:
            self.enqueue(ctx)
        else:
            graph.launch()
        return ctx

    def free(self) -> None:
        for graph in self.graphs.values():
            if graph is not None:
                graph.destroy()
        self.graphs.clear()
        self.contexts.clear()  # contexts go before the memory they point at
        for buf in [*self.dev_bufs.values(), *self.host_bufs.values(), self.scratch]:
            buf.free()
        self.event.destroy()
        self.stream.destroy()


class TrtRunner(Runner):
    """One TensorRT plan, deserialized once; each calling thread gets its own contexts, stream and buffers."""

    def __init__(
        self,
        path: Path,
        options: TrtOptions = TrtOptions(),
        *,
        axis_names: dict[str, Sequence[int | str]] | None = None,
        host_code: bool = False,
    ) -> None:
        self.path = Path(path)
        self.device = options.device
        self.cuda_graphs = options.cuda_graphs
        if host_code and not options.engine_host_code_allowed:
            raise host_code_refusal(self.path.name)
        self.trt = trt = import_tensorrt()
        self.version = str(trt.__version__)
        self.gpu = cuda.gpu_info(self.device)
        cuda.set_device(self.device)
        self._logger = get_logger(trt)
        mark = self._logger.mark()
        try:
            self._runtime = trt.Runtime(self._logger)
        except (TypeError, RuntimeError) as e:
            raise EngineError(
                f"TensorRT {self.version} could not start ({e}; {self._logger.tail(mark)}); check the GPU driver"
            ) from e
        if host_code:
            self._runtime.engine_host_code_allowed = True
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineError(
                f"TensorRT {self.version} could not load {self.path.name} ({self._logger.tail(mark)}); "
                "rebuild it on this machine with `clipdeploy build`"
            )
        self._read_io(axis_names or {})
        self._local = threading.local()
        self._states: dict[int, _ThreadState] = {}
        self._states_lock = threading.Lock()

    def _read_io(self, axis_names: dict[str, Sequence[int | str]]) -> None:
        trt, engine = self.trt, self.engine
        self.inputs, self.outputs = [], []
        self.profiles: dict[str, tuple[tuple[int, ...], ...]] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            dims = tuple(int(d) for d in engine.get_tensor_shape(name))
            names = list(axis_names.get(name, ()))
            shape = tuple(
                d if d >= 0 else (names[k] if k < len(names) and isinstance(names[k], str) else f"dim{k}")
                for k, d in enumerate(dims)
            )
            spec = IOSpec(name, dtype, shape)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                if all(d >= 0 for d in dims):
                    self.profiles[name] = (dims, dims, dims)
                else:
                    self.profiles[name] = tuple(
                        tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(name, 0)
                    )
                self.inputs.append(spec)
            else:
                self.outputs.append(spec)
        self.io = [*self.inputs, *self.outputs]
        batch_max = [self.profiles[s.name][2][0] for s in self.inputs if s.shape and isinstance(s.shape[0], str)]
        self.max_batch = min(batch_max) if batch_max else None

    def log_tail(self) -> str:
        return self._logger.tail(0)

    def describe(self) -> str:
        return f"tensorrt {base_version(self.version)} on {self.gpu.name} ({self.path.name})"

    # ---- per-thread state ----------------------------------------------------------------------

    def _state(self) -> _ThreadState:
        state = getattr(self._local, "state", None)
        if state is None:
            threading.current_thread()  # registers threads not started by `threading`, so they count as alive
            with self._states_lock:
                # Free what threads that have ended left behind, so a pool that churns threads does not leak.
                alive = {t.ident for t in threading.enumerate()}
                for ident in [i for i in self._states if i not in alive]:
                    self._states.pop(ident).free()
            state = _ThreadState(self)
            self._local.state = state
            with self._states_lock:
                # An ident reused by this new thread still holds the state of the ended thread that had it.
                stale = self._states.pop(threading.get_ident(), None)
                if stale is not None:
                    stale.free()
                self._states[threading.get_ident()] = state
        else:
            cuda.set_device(self.device)
        return state

    def close(self) -> None:
        """Free every thread's buffers and the engine. The runner cannot run afterwards."""
        with self._states_lock:
            for state in self._states.values():
                state.free()
            self._states.clear()
        self._local = threading.local()
        self.engine = None
        self._runtime = None

    def __enter__(self) -> TrtRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- running -------------------------------------------------------------------------------

    def _check_profile(self, shapes: dict[str, tuple[int, ...]]) -> None:
        for spec in self.inputs:
            lo, mid, hi = self.profiles[spec.name]
            for axis, (got, a, o, b) in enumerate(zip(shapes[spec.name], lo, mid, hi, strict=True)):
                if not a <= got <= b:
                    label = spec.shape[axis] if isinstance(spec.shape[axis], str) else f"axis {axis}"
                    fix = (
                        f"pass batches of {a} to {b}"
                        if label == "batch"
                        else f"rebuild with `clipdeploy build --shape {label}={min(a, got)}:{o}:{max(b, got)}`"
                    )
                    raise InputError(
                        f"input {spec.name!r} has {label} {got}, outside the engine's profile {a}..{b}; {fix}"
                    )

    def _bucket(self, shapes: dict[str, tuple[int, ...]]) -> int | None:
        """The padded batch a CUDA graph runs for this batch, or None when the batch is not padded."""
        if not self.cuda_graphs or self.max_batch is None:
            return None
        batch = shapes[self.inputs[0].name][0]
        return next(b for b in _buckets(self.max_batch) if b >= batch)

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = {spec.name: tuple(feed[spec.name].shape) for spec in self.inputs}
        self._check_profile(shapes)
        state = self._state()
        batch = shapes[self.inputs[0].name][0] if self.max_batch else None
        bucket = self._bucket(shapes)
        if bucket is not None:
            shapes = {name: (bucket, *shape[1:]) for name, shape in shapes.items()}
        for spec in self.inputs:
            x = feed[spec.name]
            staged = state.host_bufs[spec.name].view(spec.dtype, shapes[spec.name])
            staged[: len(x)] = x
            staged[len(x) :] = 0  # padding rows of a graph bucket; rows are independent, and cut off below
            nbytes = _nbytes(spec.dtype, shapes[spec.name])
            cuda.copy_async(state.dev_bufs[spec.name].ptr, state.host_bufs[spec.name].ptr, nbytes, "h2d", state.stream)
        ctx = state.run(tuple(shapes.items()))
        out_shapes = {spec.name: tuple(int(d) for d in ctx.get_tensor_shape(spec.name)) for spec in self.outputs}
        for spec in self.outputs:
            nbytes = _nbytes(spec.dtype, out_shapes[spec.name])
            cuda.copy_async(state.host_bufs[spec.name].ptr, state.dev_bufs[spec.name].ptr, nbytes, "d2h", state.stream)
        state.stream.synchronize()
        results = {}
        for spec in self.outputs:
            out = state.host_bufs[spec.name].view(spec.dtype, out_shapes[spec.name])
            results[spec.name] = (out[:batch] if bucket is not None else out).copy()
        return results

    def infer_torch(self, feed: dict[str, Any]) -> dict[str, Any]:
        """Run one batch of torch CUDA tensors in place: inputs are read and outputs written on the GPU.

        The work is ordered after what the caller queued on torch's current stream, and the caller's
        stream waits for it, so the outputs are safe to use there at once.
        """
        torch = require("torch", "export")

        shapes = {spec.name: tuple(feed[spec.name].shape) for spec in self.inputs}
        self._check_profile(shapes)
        state = self._state()
        ctx = state.default_context(tuple(shapes.items()))
        first = feed[self.inputs[0].name]
        producer = cuda.torch_current_stream(first)
        state.stream.wait_for(producer, state.event)
        for spec in self.inputs:
            ctx.set_tensor_address(spec.name, int(feed[spec.name].data_ptr()))
        outputs = {}
        for spec in self.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(spec.name))
            outputs[spec.name] = torch.empty(shape, dtype=cuda.torch_dtype(spec.dtype), device=first.device)
            ctx.set_tensor_address(spec.name, int(outputs[spec.name].data_ptr()))
        state.direct = True
        state.enqueue(ctx)
        state.stream.signal(producer, state.event)
        return outputs

    def run_torch(self, x: Any, batch_size: int | None = None) -> Any:
        """One-input, one-output convenience over ``infer_torch``: casts, checks and splits ``x`` by batch."""
        torch = require("torch", "export")

        (spec,) = self.inputs
        (out_spec,) = self.outputs
        if x.device.type != "cuda" or (x.device.index or 0) != self.device:
            raise InputError(
                f"the tensor is on {x.device}, the engine on cuda:{self.device}; move it with .to('cuda:{self.device}')"
            )
        x = x.detach().to(cuda.torch_dtype(spec.dtype)).contiguous()
        # The shape checks of check_feed, on a zero-copy stand-in of the tensor's shape.
        self.check_feed({spec.name: np.broadcast_to(np.zeros((), spec.dtype), tuple(x.shape))})
        step = min(b for b in (batch_size, self.max_batch, len(x)) if b)
        parts = [self.infer_torch({spec.name: x[i : i + step]})[out_spec.name] for i in range(0, len(x), step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


# ---- loading an artifact ------------------------------------------------------------------------


def load_runners(
    view: ArtifactView,
    precision: str | None,
    options: TrtOptions,
    preference: Sequence[str],
    *,
    verify: bool = True,
) -> tuple[dict[str, Variant], dict[str, Runner]]:
    """The engine each tower runs, and its runner."""
    for tower in view.towers:
        if not _engines(view, tower, precision):
            raise _no_engine(tower, precision)
    trt = import_tensorrt()
    gpu = cuda.gpu_info(options.device)
    chosen: dict[str, Variant] = {}
    runners: dict[str, Runner] = {}
    for tower, facts in view.towers.items():
        variant = select_engine(
            view, tower, precision, gpu, str(trt.__version__), preference, options.engine_host_code_allowed
        )
        if verify:
            verify_files(view.root, variant_files(variant))
        if (
            variant.extra.get("gpu")
            and variant.extra.get("gpu") != gpu.name
            and variant.extra.get("hardware_compatibility", "none") == "none"
        ):
            log.warning(
                "clipdeploy: %s was built on %s and runs here on %s (same compute capability %s); "
                "TensorRT advises rebuilding per GPU model for speed",
                variant.file,
                variant.extra["gpu"],
                gpu.name,
                gpu.cc,
            )
        axis_names = {t.name: t.shape for t in facts.inputs}
        runners[tower] = TrtRunner(
            view.root / variant.file, options, axis_names=axis_names,
            host_code=bool(variant.extra.get("version_compatible")),
        )
        chosen[tower] = variant
    return chosen, runners


def unavailable_reason(
    view: ArtifactView, precision: str | None, options: TrtOptions, preference: Sequence[str]
) -> str | None:
    """Why ``backend="auto"`` cannot use TensorRT for this artifact here; None when it can."""
    if not view.variants_of(format="tensorrt"):
        return "the artifact has no TensorRT engines"
    try:
        trt = import_tensorrt()
        gpu = cuda.gpu_info(options.device)
        for tower in view.towers:
            select_engine(
                view, tower, precision, gpu, str(trt.__version__), preference, options.engine_host_code_allowed
            )
    except ClipDeployError as e:
        return str(e)
    return None


# ---- registration -------------------------------------------------------------------------------

NAME = "tensorrt"


def options_from(settings: LoadSettings) -> TrtOptions:
    """The runtime options ``load()``'s settings ask for (a bad value is refused here, before any file opens)."""
    return TrtOptions(
        device=settings.device,
        cuda_graphs=settings.cuda_graphs,
        engine_host_code_allowed=settings.engine_host_code_allowed,
    )


def _open(view: ArtifactView, precision: str | None, settings: LoadSettings, verify: bool) -> registry.Opened:
    preference = registry.get(NAME).preference(settings)
    return load_runners(view, precision, options_from(settings), preference, verify=verify)


def _auto(view: ArtifactView, precision: str | None, settings: LoadSettings) -> str | None:
    return unavailable_reason(view, precision, options_from(settings), registry.get(NAME).preference(settings))


def _unavailable(device: str) -> str | None:
    if device != "cuda":
        return "needs an NVIDIA GPU, and none was found (nvidia-smi); run the benchmark on a GPU machine"
    if not registry.has_module("tensorrt"):
        return "TensorRT is not installed; pip install 'clipdeploy[tensorrt]'"
    return None


# auto tries it first: when the artifact has engines that fit this GPU and TensorRT, nothing runs them faster.
SPEC = registry.register(BackendSpec(
    NAME, "tensorrt", ("cuda",), _open, _unavailable,
    target=lambda settings: NAME, auto=_auto, auto_rank=0, bench_target=lambda device: NAME,
    check=options_from,
))
