"""Square crops of the bundled photographs at several scales: real-image data for gates and runtime tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from clipdeploy.calibration.bundled import sample_images


def write_crops(folder: Path, n: int, seed: int) -> Path:
    """``n`` random square crops (48 px up to the photo's short side) as JPEGs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [Image.open(p).convert("RGB") for p in sample_images()]
    for i in range(n):
        img = photos[i % len(photos)]
        side = int(rng.integers(48, min(img.size) + 1))
        x, y = (int(rng.integers(0, d - side + 1)) for d in img.size)
        img.crop((x, y, x + side, y + side)).save(folder / f"{i:03d}.jpg")
    return folder
