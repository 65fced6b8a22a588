"""Writes photo-crops.tar: 64 crops of the 8 photographs bundled with clipdeploy, so the offline
quickstart has the 32 held-out images its accuracy gate needs (plus 32 to calibrate). Crops of eight
photos are real images but little variety: enough to run the stage, not to trust an int8 model.

    python configs/data/make_photo_crops.py   # from the repository root; deterministic
"""

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
photos = sorted((ROOT / "src" / "clipdeploy" / "data" / "images").glob("*.jpg"))
rng = np.random.default_rng(0)
with tarfile.open(Path(__file__).with_name("photo-crops.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
    for i in range(64):
        img = Image.open(photos[i % len(photos)]).convert("RGB")
        side = int(rng.integers(min(img.size) // 4, min(img.size) + 1))
        x, y = (int(rng.integers(0, d - side + 1)) for d in img.size)
        buf = io.BytesIO()
        img.crop((x, y, x + side, y + side)).resize((96, 96), Image.BICUBIC).save(buf, "JPEG", quality=85)
        info = tarfile.TarInfo(f"crops/{i:03d}.jpg")
        info.size, info.mtime, info.mode = len(buf.getvalue()), 0, 0o644
        tar.addfile(info, io.BytesIO(buf.getvalue()))
