"""One served model: its session, a batcher per tower, and the label embeddings /v1/classify reuses."""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor
from functools import cached_property
from typing import Any

import numpy as np
from PIL import Image

from clipdeploy.artifact.view import ArtifactView
from clipdeploy.serve.batcher import Batcher
from clipdeploy.serve.config import ServeConfig
from clipdeploy.serve.metrics import Metrics

TOWERS = ("image", "text")


class ServedModel:
    """A session behind two batchers. Rows come back exactly as ``session.encode_pixels/encode_tokens`` give them."""

    def __init__(self, name: str, session: Any, cfg: ServeConfig, metrics: Metrics | None = None) -> None:
        self.name = name
        self.session = session
        self.metrics = metrics
        self.batchers: dict[str, Batcher[np.ndarray, np.ndarray]] = {}
        for tower, run in (("image", self._run_image), ("text", self._run_text)):
            on_batch = None if metrics is None else metrics.batch_size.labels(name, tower).observe
            self.batchers[tower] = Batcher(
                run, max_batch=cfg.max_batch, max_wait_s=cfg.max_wait_ms / 1000.0, max_queue=cfg.max_queue,
                name=f"{name}-{tower}", on_batch=on_batch,
            )  # fmt: skip
            if metrics is not None:
                metrics.watch_depth(name, tower, self.batchers[tower])
        self._labels: OrderedDict[str, np.ndarray] = OrderedDict()  # a digest of (template, labels)
        self._labels_lock = threading.Lock()
        self._label_cache_size = cfg.label_cache
        self.warm = False

    # ---- facts ------------------------------------------------------------------------------------

    @property
    def dimensions(self) -> int:
        return int(self.session.embed_dim)

    def card(self) -> dict[str, Any]:
        """The /v1/models entry."""
        return {
            "id": self.name,
            "object": "model",
            "created": 0,
            "owned_by": "clipdeploy",
            "model": self.session.model_name,
            "dimensions": self.dimensions,
            "backend": self.session.backend,
            "variants": {t: f"{v.precision} {v.format}" for t, v in self.session.variants.items()},
            "context_length": self.context_length,
            "describe": self.session.describe(),
            "ready": self.warm,
        }

    @property
    def preprocessor(self) -> Any:
        """The session's own preprocessor: the same pixels ``session.encode_image`` makes."""
        return self.session.preprocessor

    @cached_property
    def view(self) -> ArtifactView:
        """The served artifact's manifest, typed."""
        return ArtifactView.of(self.session.root, self.session.manifest)

    @property
    def context_length(self) -> int | None:
        return self.view.context_length

    # ---- inference (in each batcher's own thread) --------------------------------------------

    def _run_image(self, pixels: list[np.ndarray]) -> Sequence[np.ndarray]:
        out = self.session.encode_pixels(np.stack(pixels))
        if self.metrics is not None:
            self.metrics.items.labels(self.name, "image").inc(len(pixels))
        return list(out)

    def _run_text(self, ids: list[np.ndarray]) -> Sequence[np.ndarray]:
        out = self.session.encode_tokens(np.stack(ids))
        if self.metrics is not None:
            self.metrics.items.labels(self.name, "text").inc(len(ids))
        return list(out)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """Full-context ids (the batcher trims each batch as ``encode_text`` would) and each text's token count."""
        ids = np.asarray(self.session.tokenize(texts))
        pad = getattr(self.session.tokenizer, "pad_token_id", 0)
        return ids, [int(n) for n in (ids != pad).sum(axis=1)]

    def warm_up(self) -> None:
        """One real inference on each tower, through the same functions requests use (blocking)."""
        pixels = self.session.preprocess(Image.new("RGB", (64, 64), (127, 127, 127)))
        self._run_image([pixels[0]])
        ids, _ = self.tokenize(["a photo of a cat"])
        self._run_text([ids[0]])
        self.warm = True

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        for b in self.batchers.values():
            b.start()

    async def stop(self) -> None:
        await asyncio.gather(*(b.stop() for b in self.batchers.values()))

    # ---- labels ------------------------------------------------------------------------------

    def cached_labels(self, key: str) -> np.ndarray | None:
        with self._labels_lock:
            emb = self._labels.get(key)
            if emb is not None:
                self._labels.move_to_end(key)
            return emb

    def cache_labels(self, key: str, emb: np.ndarray) -> None:
        if self._label_cache_size <= 0:
            return
        with self._labels_lock:
            self._labels[key] = emb
            self._labels.move_to_end(key)
            while len(self._labels) > self._label_cache_size:
                self._labels.popitem(last=False)


def decode_pool(cfg: ServeConfig) -> Executor:
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=cfg.decode_workers, thread_name_prefix="clipdeploy-decode")
