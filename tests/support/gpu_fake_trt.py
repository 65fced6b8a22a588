"""A stand-in ``tensorrt`` module whose one engine does real CUDA work, for testing the CUDA runtime on a GPU
without TensorRT.

The engine copies the first ``EMBED`` values of each input row into its output row with one
``cudaMemcpy2DAsync`` on the stream it is given, so the runner's buffers, copies, streams, events,
CUDA graphs and torch zero-copy path all run for real, and the result is exactly predictable:
``out = x.reshape(N, -1)[:, :EMBED]``. It says nothing about TensorRT itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

__version__ = "11.4.0.106"
EMBED = 16
ROW = (3, 8, 8)
PROFILE = ([1, *ROW], [4, *ROW], [16, *ROW])


def expected(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(len(x), -1)[:, :EMBED])


class ILogger:
    Severity = SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

    def __init__(self) -> None:
        pass


DataType = SimpleNamespace(FLOAT="float32")
TensorIOMode = SimpleNamespace(INPUT="input", OUTPUT="output")
ExecutionContextAllocationStrategy = SimpleNamespace(STATIC=0, USER_MANAGED=2)


def nptype(dtype: str) -> type:
    return np.dtype(dtype).type


class Runtime:
    def __init__(self, logger: ILogger) -> None:
        self.logger = logger
        self.engine_host_code_allowed = False

    def deserialize_cuda_engine(self, data: bytes) -> Engine:
        return Engine(json.loads(data))


class Engine:
    device_memory_size_v2 = 1 << 16

    def __init__(self, plan: dict) -> None:
        self.plan = plan
        self.num_io_tensors = 2

    def get_tensor_name(self, i: int) -> str:
        return ("pixel_values", "image_embeds")[i]

    def get_tensor_mode(self, name: str) -> str:
        return TensorIOMode.INPUT if name == "pixel_values" else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> str:
        return DataType.FLOAT

    def get_tensor_shape(self, name: str) -> list[int]:
        return [-1, *ROW] if name == "pixel_values" else [-1, EMBED]

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[list[int]]:
        return [list(s) for s in PROFILE]

    def create_execution_context(self, strategy: int) -> Context:
        return Context()


class Context:
    def __init__(self) -> None:
        self.shape: tuple[int, ...] | None = None
        self.addresses: dict[str, int] = {}
        self.memory: int | None = None

    def set_device_memory(self, ptr: int, size: int) -> None:
        self.memory = ptr

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        ok = len(shape) == 4 and PROFILE[0][0] <= shape[0] <= PROFILE[2][0] and tuple(shape[1:]) == ROW
        if ok:
            self.shape = tuple(shape)
        return ok

    def get_tensor_shape(self, name: str) -> list[int]:
        assert self.shape is not None
        return list(self.shape) if name == "pixel_values" else [self.shape[0], EMBED]

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        from cuda.bindings import runtime as cudart

        assert self.memory is not None and self.shape is not None
        row_bytes = int(np.prod(ROW)) * 4
        (err,) = cudart.cudaMemcpy2DAsync(
            self.addresses["image_embeds"],
            EMBED * 4,
            self.addresses["pixel_values"],
            row_bytes,
            EMBED * 4,
            self.shape[0],
            cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
            stream,
        )
        return int(err) == 0


def write_plan(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(json.dumps({"fake": True}).encode())
    return path
