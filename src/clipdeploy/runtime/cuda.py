"""A thin, checked layer over cuda-python's runtime API, for the TensorRT backend and builder.

The GPU's identity, device and pinned host memory, streams, events and graphs. Every call's error
code is checked. cuda-python (and torch, for the zero-copy helpers at the end) is imported only
inside functions, so ``import clipdeploy`` never needs either.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy.deps import require
from clipdeploy.errors import DependencyError, EngineError, InputError, UsageError

INSTALL_HINT = (
    "pip install 'clipdeploy[tensorrt]' (TensorRT 11, CUDA 13) or 'clipdeploy[tensorrt10]' (TensorRT 10, CUDA 12)"
)


# Where the NVIDIA driver lists its GPUs; tests point these elsewhere to act out both kinds of machine.
PROC_GPUS = Path("/proc/driver/nvidia/gpus")
NVIDIA_SMI = "nvidia-smi"
NO_GPU = "this machine has no NVIDIA GPU (no driver lists one)"


def gpu_present() -> bool:
    """Whether the NVIDIA driver sees a GPU here, asked of the driver (its /proc entries, else ``nvidia-smi -L``),
    not of cuda-python or TensorRT, so that it answers the same whether or not those are installed."""
    try:
        if PROC_GPUS.is_dir() and any(PROC_GPUS.iterdir()):
            return True
    except OSError:
        pass
    smi = shutil.which(NVIDIA_SMI)
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and any(line.startswith("GPU ") for line in out.stdout.splitlines())


def import_cudart() -> Any:
    """cuda-python's runtime module, or a DependencyError that says what to install."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as e:
        raise DependencyError(f"the TensorRT backend needs cuda-python ({e}); install it with {INSTALL_HINT}") from e
    return cudart


def _error_text(cudart: Any, err: Any) -> str:
    name = getattr(err, "name", str(err))
    try:
        code, text = cudart.cudaGetErrorString(err)
        if int(code) == 0:
            name = f"{name}: {text.decode() if isinstance(text, bytes) else text}"
    except Exception:  # the error text is a courtesy; never hide the original error behind it
        pass
    return name


def check(result: Any, what: str) -> Any:
    """Unwrap a cuda-python result ``(err, *values)``; raise EngineError naming the call on failure."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineError(
            f"CUDA {what} failed ({_error_text(import_cudart(), err)}); check the GPU and driver with nvidia-smi"
        )
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


# ---- the GPU ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device, as the manifest records it and engine matching compares it."""

    index: int  # CUDA device ordinal
    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: tuple[int, int]  # (major, minor)
    total_memory: int  # bytes

    @property
    def cc(self) -> str:
        """Compute capability as the manifest writes it: "9.0"."""
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    @property
    def sm(self) -> str:
        """Compute capability as plan names write it: "sm90"."""
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"


def device_count() -> int:
    """How many CUDA GPUs this process can use; 0 when there is no GPU or no usable driver."""
    cudart = import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    return int(count) if int(err) == 0 and count else 0


def gpu_info(device: int = 0) -> GpuInfo:
    """Name and compute capability of ``device``; a one-line error when there is no such GPU."""
    cudart = import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or not count:
        reason = _error_text(cudart, err) if int(err) != 0 else "no devices"
        raise DependencyError(
            f"no usable NVIDIA GPU ({reason}); TensorRT needs a GPU and its driver: run on a GPU machine, "
            "or use backend='onnxruntime' (CLI: --backend onnxruntime)"
        )
    if not 0 <= device < count:
        raise UsageError(f"device {device} does not exist: this machine has {count} GPU(s), numbered 0 to {count - 1}")
    props = check(cudart.cudaGetDeviceProperties(device), f"cudaGetDeviceProperties({device})")
    raw = props.name
    name = raw.decode(errors="replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
    return GpuInfo(
        device, name.split("\x00")[0].strip(), (int(props.major), int(props.minor)), int(props.totalGlobalMem)
    )


def set_device(device: int) -> None:
    """Make ``device`` current for this thread (CUDA's current device is per thread)."""
    check(import_cudart().cudaSetDevice(device), f"cudaSetDevice({device})")


# ---- memory -------------------------------------------------------------------------------------


class DeviceBuffer:
    """``nbytes`` of device memory from cudaMalloc."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        self.ptr = int(check(import_cudart().cudaMalloc(max(self.nbytes, 1)), f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        if self.ptr:
            check(import_cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class HostBuffer:
    """``nbytes`` of pinned host memory (cudaMallocHost), so copies to and from the GPU are truly async."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        self.ptr = int(check(import_cudart().cudaMallocHost(max(self.nbytes, 1)), f"cudaMallocHost({self.nbytes})"))
        self._bytes = np.ctypeslib.as_array((ctypes.c_uint8 * max(self.nbytes, 1)).from_address(self.ptr))

    def view(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A numpy array over the start of this buffer; valid until ``free``."""
        count = int(np.prod(shape, dtype=np.int64))
        return self._bytes[: count * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            self._bytes = np.empty(0, np.uint8)
            check(import_cudart().cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0


def copy_async(dst: int, src: int, nbytes: int, kind: str, stream: Stream) -> None:
    """cudaMemcpyAsync; ``kind`` is "h2d", "d2h" or "d2d"."""
    cudart = import_cudart()
    kinds = {
        "h2d": cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
        "d2h": cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
        "d2d": cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
    }
    check(cudart.cudaMemcpyAsync(dst, src, nbytes, kinds[kind], stream.handle), f"cudaMemcpyAsync({kind})")


# ---- streams, events, graphs --------------------------------------------------------------------


class Stream:
    """A non-blocking CUDA stream: TensorRT warns against the legacy default stream, which syncs everything."""

    def __init__(self) -> None:
        cudart = import_cudart()
        self._stream = check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreate")
        self.handle = int(self._stream)

    def synchronize(self) -> None:
        check(import_cudart().cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def wait_for(self, other_handle: int, event: Event) -> None:
        """Make this stream wait until the work queued so far on stream ``other_handle`` is done."""
        cudart = import_cudart()
        check(cudart.cudaEventRecord(event.event, other_handle), "cudaEventRecord")
        check(cudart.cudaStreamWaitEvent(self._stream, event.event, 0), "cudaStreamWaitEvent")

    def signal(self, other_handle: int, event: Event) -> None:
        """Make stream ``other_handle`` wait until the work queued so far on this stream is done."""
        cudart = import_cudart()
        check(cudart.cudaEventRecord(event.event, self._stream), "cudaEventRecord")
        check(cudart.cudaStreamWaitEvent(other_handle, event.event, 0), "cudaStreamWaitEvent")

    def destroy(self) -> None:
        if self.handle:
            check(import_cudart().cudaStreamDestroy(self._stream), "cudaStreamDestroy")
            self.handle = 0


class Event:
    """A CUDA event without timing, for ordering work between streams."""

    def __init__(self) -> None:
        cudart = import_cudart()
        self.event = check(cudart.cudaEventCreateWithFlags(cudart.cudaEventDisableTiming), "cudaEventCreate")

    def destroy(self) -> None:
        if self.event is not None:
            check(import_cudart().cudaEventDestroy(self.event), "cudaEventDestroy")
            self.event = None


class Graph:
    """A CUDA graph captured from the work one callable enqueues on a stream, replayed by ``launch``.

    A graph freezes shapes and addresses: capture it only over static buffers.
    """

    def __init__(self, stream: Stream, enqueue: Any) -> None:
        cudart = import_cudart()
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal  # other threads may use CUDA meanwhile
        check(cudart.cudaStreamBeginCapture(stream.handle, mode), "cudaStreamBeginCapture")
        try:
            enqueue()
        finally:
            # End the capture even when enqueue failed, or the stream stays unusable.
            graph = check(cudart.cudaStreamEndCapture(stream.handle), "cudaStreamEndCapture")
        self._graph = graph
        self._exec = check(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        self._stream = stream

    def launch(self) -> None:
        check(import_cudart().cudaGraphLaunch(self._exec, self._stream.handle), "cudaGraphLaunch")

    def destroy(self) -> None:
        cudart = import_cudart()
        if self._exec is not None:
            check(cudart.cudaGraphExecDestroy(self._exec), "cudaGraphExecDestroy")
            check(cudart.cudaGraphDestroy(self._graph), "cudaGraphDestroy")
            self._exec = self._graph = None


# ---- torch interop (zero-copy) ------------------------------------------------------------------


def is_torch_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor, without importing torch."""
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr") and hasattr(x, "is_cuda")


def torch_dtype(np_dtype: np.dtype) -> Any:
    torch = require("torch", "export")

    return {
        np.dtype(np.float32): torch.float32,
        np.dtype(np.float16): torch.float16,
        np.dtype(np.int64): torch.int64,
        np.dtype(np.int32): torch.int32,
    }[np.dtype(np_dtype)]


def numpy_dtype(t: Any) -> np.dtype:
    """The numpy dtype of a torch tensor, by name: torch.float32 -> float32."""
    try:
        return np.dtype(str(t.dtype).removeprefix("torch."))
    except TypeError:
        raise InputError(
            f"a torch tensor of dtype {t.dtype} cannot be fed; pass float32 pixels or integer ids"
        ) from None


def torch_current_stream(t: Any) -> int:
    """The handle of torch's current stream on ``t``'s device: the stream the caller's work runs on."""
    torch = require("torch", "export")

    return int(torch.cuda.current_stream(t.device).cuda_stream)
