"""The small interface every backend implements, so sessions, validation and benchmarks need not care
which one runs: ONNX Runtime today, TensorRT and PyTorch beside it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clipdeploy.errors import InputError


@dataclass(frozen=True)
class IOSpec:
    """A runner input or output: name, numpy dtype and shape (a str is a named dynamic axis)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str, ...]


class Runner(ABC):
    """Runs one compiled tower. Safe to call from several threads at once."""

    inputs: Sequence[IOSpec]
    outputs: Sequence[IOSpec]
    max_batch: int | None = None  # the largest batch one call takes; larger ones are split by the session

    @abstractmethod
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. ``feed`` has already passed ``check_feed``."""

    def describe(self) -> str:
        return type(self).__name__

    def check_feed(self, feed: dict[str, np.ndarray]) -> None:
        """Refuse a feed that does not match this runner's inputs, naming what differs."""
        names = {spec.name for spec in self.inputs}
        if set(feed) != names:
            raise InputError(f"feed has inputs {sorted(feed)}, the model expects {sorted(names)}")
        for spec in self.inputs:
            x = feed[spec.name]
            if x.dtype != spec.dtype:
                raise InputError(f"input {spec.name!r} has dtype {x.dtype}, the model expects {spec.dtype}")
            if x.ndim != len(spec.shape) or any(
                isinstance(want, int) and got != want for got, want in zip(x.shape, spec.shape, strict=True)
            ):
                want = "[" + ", ".join(str(d) for d in spec.shape) + "]"
                raise InputError(f"input {spec.name!r} has shape {list(x.shape)}, the model expects {want}")
            if x.shape[0] < 1:
                raise InputError(f"input {spec.name!r} has an empty batch; pass at least one item")
