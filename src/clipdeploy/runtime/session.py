"""The runtime session: raw images and strings in, float32 embeddings out.

It reads only the manifest and the files it lists, and imports neither torch nor open_clip.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy import precisions
from clipdeploy.deps import require
from clipdeploy.errors import ArtifactError, InputError, UsageError
from clipdeploy.artifact.manifest import Variant, verify_files
from clipdeploy.artifact.view import ArtifactView
from clipdeploy.runtime.backends import registry
from clipdeploy.runtime.backends.base import Runner
from clipdeploy.runtime.cuda import is_torch_tensor
from clipdeploy.runtime.padding import PADDINGS, trim_to_pooled
from clipdeploy.runtime.preprocess import ImageLike, PreprocessConfig, Preprocessor
from clipdeploy.runtime.text import load_tokenizer

log = logging.getLogger(__name__)



def _l2_normalize(x: np.ndarray) -> np.ndarray:
    # The same clamp as torch.nn.functional.normalize, which open_clip uses.
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class ClipSession:
    """Embeds images and texts with one artifact. Safe to share between threads."""

    def __init__(
        self,
        view: ArtifactView,
        runners: dict[str, Runner],
        chosen: dict[str, Variant],
        backend: str,
        why: str | None = None,
    ) -> None:
        self.view = view  # the artifact's manifest, typed
        self.root = view.root
        self.manifest = dict(view.raw)  # the manifest as a dict, for callers that read it so
        self.backend = backend
        self.why = why  # why backend="auto" picked this backend and precision; None when both were named
        self.variants = chosen  # tower -> the variant that runs it
        self._runners = runners
        self._preprocessor = Preprocessor(PreprocessConfig.from_dict(view.preprocess))
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()
        self.logit_scale = view.model.logit_scale
        self.logit_bias = view.model.logit_bias

    # ---- description -----------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.view.model.name

    @property
    def embed_dim(self) -> int:
        return self.view.model.embed_dim

    @property
    def runners(self) -> dict[str, Runner]:
        """tower -> the backend runner that executes it (for validation and benchmarks)."""
        return dict(self._runners)

    @property
    def precision(self) -> dict[str, str]:
        """The precision each tower runs at."""
        return {tower: v.precision for tower, v in self.variants.items()}

    def describe(self) -> str:
        parts = [f"{t}: {v.precision} {v.format} on {self._runners[t].describe()}" for t, v in self.variants.items()]
        why = f" [{self.why}]" if self.why else ""
        return f"{self.model_name} ({'; '.join(parts)}){why}"

    def __repr__(self) -> str:
        return f"ClipSession({self.describe()})"

    # ---- inputs ----------------------------------------------------------------------------

    @property
    def preprocessor(self) -> Preprocessor:
        """The image preprocessor ``encode_image`` uses (``one(item, index)`` for a single image)."""
        return self._preprocessor

    def preprocess(self, images: Sequence[ImageLike] | ImageLike, *, fast_decode: bool = False) -> np.ndarray:
        """Images (PIL, paths or bytes) to float32 NCHW pixels, exactly as open_clip preprocesses them.

        ``fast_decode=True`` decodes large JPEGs at 1/2, 1/4 or 1/8 scale: faster, not exact pixels.
        """
        return self._preprocessor(images, fast_decode=fast_decode)

    @property
    def tokenizer(self) -> Any:
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(dict(self.view.tokenizer), self.root)
            return self._tokenizer

    def tokenize(self, texts: Sequence[str] | str, *, padding: str = "max_length") -> np.ndarray:
        """Strings to int64 token ids, the same ids open_clip's tokenizer gives.

        ``padding="max_length"`` (default) pads to the context length, exactly as open_clip does.
        ``padding="longest"`` pads only to the batch's longest text (EOT included), for artifacts
        whose text tower takes a dynamic length (``view.text_is_dynamic``).
        """
        if padding not in PADDINGS:
            raise UsageError(f"padding={padding!r} must be one of {', '.join(PADDINGS)}")
        ids = self.tokenizer(texts)
        if padding == "max_length":
            return ids
        if not self.view.text_is_dynamic:
            raise UsageError(
                f"padding='longest' needs a dynamic-length text tower, and {self.model_name}'s takes ids padded "
                f"to {ids.shape[1]}; use padding='max_length'"
            )
        text = self.view.tower("text")
        return trim_to_pooled(ids, str(text.pooling), text.eos_token_id)

    def truncated(self, texts: Sequence[str] | str) -> list[int]:
        """Indices of the texts longer than the context length, which ``tokenize`` (as open_clip's tokenizer
        does) cuts to it; the embedding then sees only their first ``context_length`` tokens."""
        return list(self.tokenizer.truncated(texts))

    @property
    def context_length(self) -> int:
        """The most tokens (start and end tokens included) the text tower reads."""
        return int(self.tokenizer.context_length)

    # ---- encoders --------------------------------------------------------------------------

    def _run(self, tower: str, x: np.ndarray, normalize: bool, batch_size: int | None) -> np.ndarray:
        if tower not in self._runners:
            raise ArtifactError(f"this artifact has no {tower} tower; re-export the model")
        runner = self._runners[tower]
        (spec,) = runner.inputs
        (out_spec,) = runner.outputs
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"batch_size={batch_size} must be 1 or more")
        limits = [b for b in (batch_size, runner.max_batch) if b]
        step = min(limits) if limits else len(x) or 1
        runner.check_feed({spec.name: x})
        parts = [runner.infer({spec.name: x[s]})[out_spec.name] for s in _chunks(len(x), step)]
        out = np.concatenate(parts).astype(np.float32, copy=False)
        return _l2_normalize(out) if normalize else out

    # ---- torch tensors (TensorRT addition, begin) ---------------------------------------------

    def _run_torch(self, tower: str, x: Any, normalize: bool, batch_size: int | None, return_torch: bool) -> Any:
        """Torch in and/or out. A CUDA tensor on a runner that reads device memory is never copied to the host."""
        torch = require("torch", "export")

        runner = self._runners.get(tower)
        if is_torch_tensor(x) and x.is_cuda and hasattr(runner, "run_torch"):
            if x.is_floating_point() != (tower == "image"):
                raise InputError(
                    f"a {x.dtype} tensor cannot feed the {tower} tower; pass float32 pixels or integer ids"
                )
            out = runner.run_torch(x, batch_size).float()
            out = torch.nn.functional.normalize(out, dim=-1) if normalize else out
            return out if return_torch else out.cpu().numpy()
        host = x.detach().cpu().numpy() if is_torch_tensor(x) else x
        encode = self.encode_pixels if tower == "image" else self.encode_tokens
        out = encode(host, normalize=normalize, batch_size=batch_size)
        if not return_torch:
            return out
        return torch.from_numpy(out).to(x.device) if is_torch_tensor(x) else torch.from_numpy(out)

    # ---- torch tensors (TensorRT addition, end) -----------------------------------------------

    def encode_pixels(
        self, pixels: Any, *, normalize: bool = True, batch_size: int | None = None, return_torch: bool = False
    ) -> Any:
        """float32 NCHW pixels (already preprocessed) to ``[N, D]`` image embeddings.

        ``pixels`` may be a torch tensor: on the TensorRT backend a CUDA tensor is read in place
        (zero-copy). ``return_torch=True`` returns a torch tensor, on the input's device.
        """
        if return_torch or type(pixels).__module__.startswith("torch"):
            return self._run_torch("image", pixels, normalize, batch_size, return_torch)
        x = np.asarray(pixels)
        if not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"pixels have dtype {x.dtype}; pass float32 NCHW pixels, e.g. from session.preprocess")
        return self._run("image", np.ascontiguousarray(x, dtype=np.float32), normalize, batch_size)

    def encode_tokens(
        self, tokens: Any, *, normalize: bool = True, batch_size: int | None = None, return_torch: bool = False
    ) -> Any:
        """Integer token ids ``[N, L]`` to ``[N, D]`` text embeddings. Torch tensors as for ``encode_pixels``.

        On a dynamic-length text tower, full-length and trimmed ids alike are cut after the latest
        pooled position (EOT/eos) of the batch, which cannot change the result of a causal tower.
        """
        if return_torch or type(tokens).__module__.startswith("torch"):
            return self._run_torch("text", tokens, normalize, batch_size, return_torch)
        x = np.asarray(tokens)
        if not np.issubdtype(x.dtype, np.integer):
            raise InputError(f"token ids have dtype {x.dtype}; pass integer ids, e.g. from session.tokenize")
        if self.view.text_is_dynamic and x.ndim == 2:
            # Full-length or trimmed ids alike: nothing after the latest pooled position matters.
            text = self.view.tower("text")
            x = trim_to_pooled(x, str(text.pooling), text.eos_token_id)
            limit = self.view.context_length or x.shape[1]
            if x.shape[1] > limit:
                raise InputError(
                    f"token ids reach position {x.shape[1]}, past the context length {limit}; "
                    f"truncate them to {limit} tokens, as session.tokenize does"
                )
        return self._run("text", np.ascontiguousarray(x, dtype=np.int64), normalize, batch_size)

    def encode_image(
        self,
        images: Sequence[ImageLike] | ImageLike,
        *,
        normalize: bool = True,
        batch_size: int = 32,
        fast_decode: bool = False,
        workers: int | None = None,
    ) -> np.ndarray:
        """Images (PIL, paths or bytes) to ``[N, D]`` embeddings, ``batch_size`` at a time.

        Lists longer than one batch are decoded and preprocessed by ``workers`` threads (default
        ``min(4, cpu count)``; 1 = in this thread) while the previous batch runs, at most two batches
        ahead; the result is the same as preprocessing in order. ``fast_decode`` as in ``preprocess``.
        """
        items = _as_list(images, "image")
        step = max(1, batch_size)
        if workers is not None and workers < 1:
            raise UsageError(f"workers={workers} must be 1 or more")
        n_workers = min(4, os.cpu_count() or 1) if workers is None else workers
        if len(items) <= step or n_workers == 1:
            # Errors name each item by its place in the whole list, as in the overlapped path.
            one = self._preprocessor.one
            parts = [
                self.encode_pixels(
                    np.stack([one(items[i], i, fast_decode=fast_decode) for i in range(s.start, s.stop)]),
                    normalize=normalize,
                )
                for s in _chunks(len(items), step)
            ]
            return np.concatenate(parts)
        return self._encode_image_overlapped(items, step, normalize, fast_decode, n_workers)

    def _encode_image_overlapped(
        self, items: list[Any], step: int, normalize: bool, fast_decode: bool, n_workers: int
    ) -> np.ndarray:
        h, w = self._preprocessor.cfg.size
        pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="clipdeploy-preprocess")
        pending: deque[tuple[slice, list[Future[np.ndarray]]]] = deque()
        batches = _chunks(len(items), step)

        def submit_next() -> None:
            s = next(batches, None)
            if s is not None:
                futures = [
                    pool.submit(self._preprocessor.one, items[i], i, fast_decode=fast_decode)
                    for i in range(s.start, s.stop)
                ]
                pending.append((s, futures))

        parts = []
        try:
            # While one batch runs, at most the next two are being preprocessed: memory stays ~3 batches.
            for _ in range(2):
                submit_next()
            while pending:
                s, futures = pending.popleft()
                pixels = np.empty((s.stop - s.start, 3, h, w), dtype=np.float32)
                for j, f in enumerate(futures):
                    pixels[j] = f.result()  # re-raises the item's own InputError, which names it
                submit_next()
                parts.append(self.encode_pixels(pixels, normalize=normalize))
        finally:
            for _, futures in pending:
                for f in futures:
                    f.cancel()
            pool.shutdown(wait=True)
        return np.concatenate(parts)

    def encode_text(self, texts: Sequence[str] | str, *, normalize: bool = True, batch_size: int = 256) -> np.ndarray:
        """Strings to ``[N, D]`` embeddings; a dynamic-length text tower gets each batch padded to its longest text."""
        items = _as_list(texts, "text")
        padding = "longest" if self.view.text_is_dynamic else "max_length"
        parts = [
            self.encode_tokens(self.tokenize(items[s], padding=padding), normalize=normalize)
            for s in _chunks(len(items), max(1, batch_size))
        ]
        return np.concatenate(parts)

    # ---- scores ----------------------------------------------------------------------------

    def similarity(self, image_emb: Any, text_emb: Any, *, output: str = "probs") -> np.ndarray:
        """Scores ``[N_images, N_texts]`` with the model's own logit scale and bias.

        ``output="logits"`` gives the raw logits. ``"probs"`` gives CLIP's softmax over the texts, or
        SigLIP's per-pair sigmoid when the model has a logit bias.
        """
        if output not in ("probs", "logits"):
            raise UsageError(f"output={output!r} must be 'probs' or 'logits'")
        img = _l2_normalize(np.atleast_2d(np.asarray(image_emb, dtype=np.float32)))
        txt = _l2_normalize(np.atleast_2d(np.asarray(text_emb, dtype=np.float32)))
        if img.shape[-1] != txt.shape[-1]:
            raise InputError(f"image embeddings have width {img.shape[-1]}, text embeddings {txt.shape[-1]}")
        logits = self.logit_scale * img @ txt.T
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        if output == "logits":
            return logits
        if self.logit_bias is not None:
            return 1.0 / (1.0 + np.exp(-logits))
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)


def _as_list(items: Any, kind: str) -> list[Any]:
    # One path, one blob or one PIL image is a batch of one; any other iterable is a batch.
    if isinstance(items, (str, bytes, bytearray, memoryview, os.PathLike)) or hasattr(items, "getpixel"):
        items = [items]
    else:
        try:
            items = list(items)
        except TypeError:
            items = [items]
    if not items:
        raise InputError(f"no {kind}s given: pass at least one {kind}")
    return items


def load(
    path: str | os.PathLike[str],
    backend: str = "auto",
    precision: str | None = None,
    *,
    verify: bool = True,
    providers: Sequence[str] | None = None,
    intra_op_num_threads: int | None = None,
    inter_op_num_threads: int | None = None,
    graph_optimization_level: str = "all",
    device: int = 0,
    cuda_graphs: bool = False,
    engine_host_code_allowed: bool = False,
    backend_options: dict[str, Any] | None = None,
) -> ClipSession:
    """Open an artifact directory for embedding.

    ``precision=None`` picks the fastest variant that passed its gate for the backend, and logs which.
    ``verify`` checks each file's sha256 against the manifest before it is used.
    ``backend="auto"`` runs TensorRT when the artifact has engines that fit this GPU and TensorRT
    version and TensorRT and a GPU are present, else OpenVINO on x86 CPUs with VNNI when it is installed,
    else ONNX Runtime; it logs which and why, and ``describe()`` repeats it.
    ``device``, ``cuda_graphs`` and ``engine_host_code_allowed`` are TensorRT settings (see ``TrtOptions``).
    ``backend_options`` go to registered backends (LoadSettings.extra), e.g. OpenVINO's
    ``openvino_cache_dir`` (its compiled-model cache; "" disables it) and ``openvino_performance_hint``.
    """
    if backend not in registry.choices():
        raise UsageError(f"backend {backend!r} is not one of {', '.join(registry.choices())}")
    if precision is not None:
        precisions.get(precision)  # an unknown name: one line with a suggestion
        refusal = precisions.cpu_refusal(precision)
        if refusal:
            raise UsageError(refusal)
    settings = registry.LoadSettings(
        providers=tuple(providers or ("CPUExecutionProvider",)),
        intra_op_num_threads=intra_op_num_threads,
        inter_op_num_threads=inter_op_num_threads,
        graph_optimization_level=graph_optimization_level,
        device=device,
        cuda_graphs=cuda_graphs,
        engine_host_code_allowed=engine_host_code_allowed,
        extra=dict(backend_options or {}),
    )
    registry.check_settings(settings)  # a bad option is refused whichever backend would run
    view = ArtifactView.read(Path(path))
    why = None
    if backend == registry.AUTO:
        backend, skipped = _auto(view, precision, settings)
        why = _auto_why(backend, skipped, registry.get(backend).preference(settings), precision)
    if precision is not None and precisions.get(precision).runs_file_of is not None:
        runs = precisions.get(precision).backends
        if backend not in runs:  # it would run the reference file and call it this precision
            raise UsageError(f"precision {precision!r} runs on {' or '.join(runs) or 'no backend'} only, not on "
                             f"{backend}; pass backend={runs[0] if runs else 'openvino'!r}")
    chosen, runners = registry.get(backend).load(view, precision, settings, verify)
    if verify:
        verify_files(view.root, sorted(view.files.items()))
    session = ClipSession(view, runners, chosen, backend, why)
    log.info("clipdeploy: loaded %s", session.describe())
    return session


def _auto_why(backend: str, skipped: list[str], preference: Sequence[str], precision: str | None) -> str:
    """What describe() says about an auto pick: the backends passed over and why, and the precision rule."""
    later = [n for n in registry.auto_order()[registry.auto_order().index(backend) + 1:]
             if registry.get(n).auto is not None]
    ranks = f"{backend} ranks before {', '.join(later)} here" if later else f"{backend} is the last choice"
    parts = [f"auto: {ranks}", *skipped]
    if precision is None:
        parts.append(f"the most preferred accepted precision of {', '.join(preference)}")
    return "; ".join(parts)


def _auto(view: ArtifactView, precision: str | None, settings: registry.LoadSettings) -> tuple[str, list[str]]:
    """The first backend in ``registry.auto_order()`` that this artifact can use here; logs which and why."""
    reasons = []
    for name in registry.auto_order():
        spec = registry.get(name)
        reason = "not chosen by auto" if spec.auto is None else spec.auto(view, precision, settings)
        if reason is None:
            why = f" ({'; '.join(reasons)})" if reasons else ""
            log.info("clipdeploy: backend='auto' chose %s%s", name, why)
            return name, [f"not {r}" for r in reasons]
        reasons.append(f"{name}: {reason}")
    raise ArtifactError(f"no backend can run this artifact here ({'; '.join(reasons)}); install ONNX Runtime")
