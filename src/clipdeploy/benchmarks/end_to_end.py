"""The end-to-end case: images per second from JPEG files to embeddings, exact and fast-decode preprocessing.

The bundled photographs are upscaled to about ``megapixels`` and saved as JPEG into a temp dir, so decode
and resize cost what real camera photos cost. Both modes run through ``clipdeploy.load`` (the default
backend and precision) and ``encode_image``, round-robin, median of ``rounds``; the fast-decode
embeddings' cosine against exact preprocessing is measured, not assumed.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import clipdeploy
from clipdeploy.calibration.bundled import sample_images
from clipdeploy.validation import cosine_rows

MODES = ("exact", "fast_decode")


def write_photos(folder: Path, count: int, megapixels: float) -> list[Path]:
    """``count`` JPEGs of about ``megapixels``, the bundled photos upscaled in turn (bicubic, quality 90)."""
    sources = sample_images()
    paths = []
    for i in range(count):
        img = Image.open(sources[i % len(sources)]).convert("RGB")
        scale = math.sqrt(megapixels * 1e6 / (img.width * img.height))
        big = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        path = folder / f"photo-{i:03d}.jpg"
        big.save(path, quality=90)
        paths.append(path)
    return paths


def run_end_to_end(
    artifact: Path, *, images: int, batch: int, threads: int, rounds: int = 3, megapixels: float = 12.0
) -> dict[str, Any]:
    """Images/s for each mode and the fast-decode cosine; one dict for the report's ``end_to_end``."""
    session = clipdeploy.load(artifact, intra_op_num_threads=threads)
    with tempfile.TemporaryDirectory(prefix="clipdeploy-e2e-") as tmp:
        paths = write_photos(Path(tmp), images, megapixels)
        size = Image.open(paths[0]).size
        emb: dict[str, np.ndarray] = {}
        seconds: dict[str, list[float]] = {m: [] for m in MODES}
        for mode in MODES:  # untimed warm-up: first-call allocations, file cache
            emb[mode] = session.encode_image(paths[:batch], batch_size=batch, fast_decode=mode == "fast_decode")
        for _ in range(rounds):
            for mode in MODES:
                start = time.perf_counter()
                emb[mode] = session.encode_image(paths, batch_size=batch, fast_decode=mode == "fast_decode")
                seconds[mode].append(time.perf_counter() - start)
    cos = cosine_rows(emb["fast_decode"], emb["exact"])
    return {
        "images": images,
        "image_size": list(size),
        "megapixels": round(size[0] * size[1] / 1e6, 1),
        "batch": batch,
        "threads": threads,
        "rounds": rounds,
        "session": session.describe(),
        "images_per_s": {m: images / statistics.median(s) for m, s in seconds.items()},
        "fast_decode_cos_min": float(cos.min()),
        "fast_decode_cos_mean": float(cos.mean()),
    }


def describe(e2e: dict[str, Any]) -> list[str]:
    """Report lines for the end-to-end case."""
    rate = e2e["images_per_s"]
    return [
        f"end to end ({e2e['images']} JPEG files of {e2e['image_size'][0]}x{e2e['image_size'][1]}, "
        f"{e2e['megapixels']:g} MP, to embeddings; batch {e2e['batch']}, {e2e['threads']} threads, "
        f"median of {e2e['rounds']}; {e2e['session']}):",
        f"exact preprocessing {rate['exact']:.2f} images/s; fast_decode {rate['fast_decode']:.2f} images/s "
        f"({rate['fast_decode'] / rate['exact']:.2f}x); fast_decode cosine vs exact: "
        f"min {e2e['fast_decode_cos_min']:.5f}, mean {e2e['fast_decode_cos_mean']:.5f}",
    ]
