"""A trained micro CLIP for realistic precision tests.

Random weights make weak accuracy tests: embeddings of different images are nearly alike, so
retrieval margins are tiny. This module renders a captioned dataset of coloured shapes at positions
("a large red circle on the left", sometimes without size or position), trains a micro open_clip
architecture on it for a minute or two on CPU, and caches the checkpoint. The result has real
zero-shot structure: class prompts ("a photo of a red circle") retrieve the right images.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

import numpy as np

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
          "purple": (150, 50, 190)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.18, "large": 0.34}
POSITIONS = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72),
             "center": (0.5, 0.5)}
IMAGE_SIZE = 64
MODEL_NAME = "micro-shapes"
CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 96, "head_width": 48, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TRAIN_STEPS = 400
BATCH = 96
POOL = 3000  # distinct training images
VERSION = 2  # bump to retrain when the recipe changes


def draw(rng: np.random.Generator) -> tuple[object, dict[str, str]]:
    """One image and the attributes it shows."""
    from PIL import Image, ImageDraw

    attrs = {"color": str(rng.choice(list(COLORS))), "shape": str(rng.choice(SHAPES)),
             "size": str(rng.choice(list(SIZES))), "position": str(rng.choice(list(POSITIONS)))}
    bg = tuple(int(v) for v in rng.integers(180, 256, 3))
    s = IMAGE_SIZE * 2
    img = Image.new("RGB", (s, s), bg)
    canvas = ImageDraw.Draw(img)
    px, py = POSITIONS[attrs["position"]]
    cx, cy = (px + rng.normal(0, 0.03)) * s, (py + rng.normal(0, 0.03)) * s
    r = SIZES[attrs["size"]] * s / 2 * rng.uniform(0.85, 1.15)
    fill = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in COLORS[attrs["color"]])
    if attrs["shape"] == "circle":
        canvas.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif attrs["shape"] == "square":
        canvas.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        canvas.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    noise = rng.normal(0, 6, (s, s, 3))
    img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))
    return img, attrs


def caption(attrs: dict[str, str], rng: np.random.Generator) -> str:
    """"a large red circle on the left", leaving out size or position now and then."""
    words = ["a"]
    if rng.random() < 0.7:
        words.append(attrs["size"])
    words += [attrs["color"], attrs["shape"]]
    if rng.random() < 0.7:
        words += ["on the" if attrs["position"] in ("left", "right") else "at the", attrs["position"]]
    return " ".join(words)


def label(attrs: dict[str, str]) -> str:
    return f"a photo of a {attrs['color']} {attrs['shape']}"


def class_prompts() -> list[str]:
    return [f"a photo of a {c} {s}" for c in COLORS for s in SHAPES]


def write_dataset(folder: Path, n: int, seed: int) -> list[str]:
    """Render ``n`` images into ``folder`` as JPEGs; returns their class prompts in file order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = []
    for i in range(n):
        img, attrs = draw(rng)
        img.save(folder / f"{i:05d}.jpg", quality=92)
        labels.append(label(attrs))
    return labels


def _cache_dir() -> Path:
    return Path(os.environ.get("CLIPDEPLOY_TEST_CACHE", Path.home() / ".cache" / "clipdeploy-tests"))


def config_file(folder: Path) -> Path:
    path = folder / f"{MODEL_NAME}.json"
    path.write_text(json.dumps(CONFIG))
    return path


def trained_checkpoint() -> Path:
    """Train (once, then cached) and return the micro model's checkpoint."""
    recipe = json.dumps([CONFIG, TRAIN_STEPS, BATCH, POOL, VERSION, sorted(COLORS), SHAPES], sort_keys=True)
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    path = _cache_dir() / f"{MODEL_NAME}-{key}.pt"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Parallel test workers (pytest -n) wait for one training run instead of each doing their own.
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return path
        return _train(path)


def _train(path: Path) -> Path:
    import open_clip
    import torch
    import torch.nn.functional as F

    from clipdeploy.export.loading import register_model_config

    path.parent.mkdir(parents=True, exist_ok=True)
    register_model_config(MODEL_NAME, config_file(path.parent))
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL_NAME)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    from open_clip.transform import PreprocessCfg, image_transform_v2

    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    rng = np.random.default_rng(1)
    # Rendering is the slow part on CPU: draw a pool once, vary only the captions per step.
    pool = [draw(rng) for _ in range(POOL)]
    pixels = torch.stack([preprocess(img) for img, _ in pool])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=TRAIN_STEPS, pct_start=0.1)
    threads = torch.get_num_threads()
    model.train()
    for _ in range(TRAIN_STEPS):
        idx = rng.choice(POOL, BATCH, replace=False)
        texts = tokenizer([caption(pool[i][1], rng) for i in idx])
        img, txt, scale = model(pixels[torch.as_tensor(idx)], texts)
        logits = scale * img @ txt.T
        target = torch.arange(BATCH)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    torch.set_num_threads(threads)
    model.eval()
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return path


def plant_outliers(state: dict, block: int = 1, channels: tuple[int, ...] = (3, 17), factor: float = 300.0) -> dict:
    """Give the activation entering block ``block``'s MLP a few huge channels, as trained ViTs show
    them, without changing the fp32 function: scale the pre-MLP LayerNorm's gain and bias up and the
    first MLP weight's matching input columns down by the same factor. (80x was enough for one
    training run of the checkpoint and not for another: 300x fails plain int8 on either.)"""
    state = {k: v.clone() for k, v in state.items()}
    prefix = f"visual.transformer.resblocks.{block}"
    for c in channels:
        state[f"{prefix}.ln_2.weight"][c] *= factor
        state[f"{prefix}.ln_2.bias"][c] *= factor
        state[f"{prefix}.mlp.c_fc.weight"][:, c] /= factor
    return state
