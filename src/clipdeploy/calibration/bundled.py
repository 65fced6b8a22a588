"""The files shipped in ``clipdeploy/data/``: sample photographs and prompts, ImageNet names and templates.

The parity check, the engine validator, the bench inputs and the calibration defaults all read them.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def data_lines(name: str) -> list[str]:
    """The lines of the bundled text file ``name``, as they are."""
    return (DATA_DIR / name).read_text(encoding="utf-8").splitlines()


def sample_images() -> list[Path]:
    """The bundled real photographs the parity check (and the quickstart) use."""
    return sorted((DATA_DIR / "images").glob("*.jpg"))


def sample_prompts() -> list[str]:
    """The bundled prompts, blank lines left out."""
    return [line for line in data_lines("prompts.txt") if line.strip()]
