"""The one set of inputs every contender gets, made once by the runtime's own preprocess and tokenizer.

Pixels come from the bundled photographs and token ids from the bundled prompts, repeated to the
largest batch; a batch of ``b`` is always the first ``b`` rows. Text is measured at the full
context length, and at the prompts' own length (the longest prompt, start and end tokens included)
where the artifact's text input has a dynamic sequence axis.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy.artifact.view import ArtifactView, TowerFacts
from clipdeploy.calibration.bundled import sample_images, sample_prompts
from clipdeploy.runtime.padding import trim_to_pooled
from clipdeploy.runtime.preprocess import PreprocessConfig, Preprocessor
from clipdeploy.runtime.text import load_tokenizer


@dataclass(frozen=True)
class BenchInputs:
    """Inputs for all cases, and where they came from."""

    pixels: np.ndarray  # float32 [max_batch, 3, H, W]
    tokens: np.ndarray  # int64 [max_batch, context_length], padded as the tokenizer pads
    prompt_length: int  # the longest bundled prompt in tokens, start and end tokens included
    images: tuple[str, ...]  # file names of the photographs, in row order before repetition
    prompts: tuple[str, ...]  # the prompts, in row order before repetition

    @property
    def context_length(self) -> int:
        return int(self.tokens.shape[1])

    def image_batch(self, batch: int) -> np.ndarray:
        return self.pixels[:batch]

    def text_batch(self, batch: int, seq_len: int) -> np.ndarray:
        """The first ``batch`` rows, cut to ``seq_len`` columns (the padding after the end token)."""
        return np.ascontiguousarray(self.tokens[:batch, :seq_len])

    def batch(self, tower: str, batch: int, seq_len: int | None) -> np.ndarray:
        if tower == "image":
            return self.image_batch(batch)
        return self.text_batch(batch, seq_len or self.context_length)

    def save(self, path: Path) -> None:
        np.savez(
            path,
            pixels=self.pixels,
            tokens=self.tokens,
            prompt_length=np.int64(self.prompt_length),
            images=np.array(self.images),
            prompts=np.array(self.prompts),
        )

    @classmethod
    def load(cls, path: Path) -> BenchInputs:
        with np.load(path) as z:
            return cls(
                pixels=z["pixels"],
                tokens=z["tokens"],
                prompt_length=int(z["prompt_length"]),
                images=tuple(str(s) for s in z["images"]),
                prompts=tuple(str(s) for s in z["prompts"]),
            )


def array_sha256(x: np.ndarray) -> str:
    """A digest of an array's dtype, shape and bytes: equal digests mean identical inputs."""
    x = np.ascontiguousarray(x)
    digest = hashlib.sha256(f"{x.dtype.str}{x.shape}".encode())
    digest.update(x.tobytes())
    return digest.hexdigest()


def used_length(tokens: np.ndarray, pad_id: int = 0) -> int:
    """Columns up to and including the last non-padding token of any row."""
    used = np.nonzero((np.asarray(tokens) != pad_id).any(axis=0))[0]
    return int(used[-1]) + 1 if used.size else 1


def prompt_columns(ids: np.ndarray, text: TowerFacts) -> int:
    """Columns the runtime keeps of these ids when it pads to the longest text: up to the last pooled position."""
    if text.pooling in ("argmax", "eos"):
        return int(trim_to_pooled(ids, text.pooling, text.eos_token_id).shape[1])
    return used_length(ids)


def _repeat(items: list[Any], n: int) -> list[Any]:
    return [items[i % len(items)] for i in range(n)]


def make_inputs(view: ArtifactView, max_batch: int) -> BenchInputs:
    """Pixels and token ids for batches up to ``max_batch``, from the artifact's own preprocessing."""
    images = sample_images()
    prompts = sample_prompts()
    towers = view.towers
    if "image" in towers:
        pixels = Preprocessor(PreprocessConfig.from_dict(view.preprocess))(images)
        pixels = pixels[np.arange(max_batch) % len(pixels)]
    else:
        pixels = np.zeros((0, 3, 1, 1), np.float32)
    if "text" in towers:
        ids = np.asarray(load_tokenizer(dict(view.tokenizer), view.root)(prompts), dtype=np.int64)
        tokens = ids[np.arange(max_batch) % len(ids)]
        prompt_length = prompt_columns(ids, towers["text"])
    else:
        tokens = np.zeros((0, 1), np.int64)
        prompt_length = 1
    return BenchInputs(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        tokens=np.ascontiguousarray(tokens),
        prompt_length=prompt_length,
        images=tuple(p.name for p in _repeat(images, min(max_batch, len(images)))),
        prompts=tuple(_repeat(prompts, min(max_batch, len(prompts)))),
    )


def text_is_dynamic(view: ArtifactView) -> bool:
    """Whether the artifact's text input has a named (dynamic) sequence axis."""
    text = view.towers.get("text")
    shape = text.inputs[0].shape if text is not None and text.inputs else ()
    return len(shape) > 1 and isinstance(shape[1], str)
