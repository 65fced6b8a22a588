"""Names shared by tests in several folders. A module of its own: conftest.py files are pytest's to
import, not the tests'."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tests.support.models import MODELS

TESTS = Path(__file__).resolve().parents[1]
MICRO_CONFIG: Path = MODELS["micro-vit"].config_path  # type: ignore[assignment]  (a shipped JSON file)
# Held-out data: none of these images or strings is used by the exporter's own parity check.
HELD_OUT_SKIMAGE = ("horse", "brick", "retina", "immunohistochemistry", "cell", "grass", "gravel")
HELD_OUT_TEXTS = (
    "a horse standing in a field",
    "a brick wall",
    "a microscope image of stained cells",
    "A red Motorcycle parked by the road!!",
    "grass, close up",
    "two dogs & a cat",
    "the number 42 written on a board",
    "an X-ray of a hand",
    "",
    "café au lait",
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that reaches for the hub fails fast instead of hanging


@dataclass
class Exported:
    """An artifact and the PyTorch model it came from."""

    name: str
    path: Path
    model: object
    tokenizer: object
    preprocess: object
    checkpoint: Path
