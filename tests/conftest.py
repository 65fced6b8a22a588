"""Shared fixtures: artifacts exported once per test session, from checkpoints saved here.

Nothing reaches a hub: the weights are seeded random ones, saved to a local checkpoint and exported
through ``--checkpoint``, the offline path users take with their own weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.models import MODELS
from tests.support.testdata import HELD_OUT_SKIMAGE, Exported


def _export_from_checkpoint(tmp: Path, name: str, seed: int, model_config: Path | None = None) -> Exported:
    import open_clip
    import torch

    from clipdeploy.export.config import ExportConfig
    from clipdeploy.export.exporter import export_model
    from clipdeploy.export.loading import register_model_config

    if model_config is not None:
        register_model_config(name, model_config)
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    model.eval()
    ckpt = tmp / f"{name}.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp / f"{name}-artifact"
    export_model(ExportConfig(model=name, output=out, checkpoint=ckpt, model_config=model_config))
    from open_clip.transform import PreprocessCfg, image_transform_v2

    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return Exported(name, out, model, open_clip.get_tokenizer(name), preprocess, ckpt)


@pytest.fixture(scope="session")
def micro_artifact(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """A tiny ViT given as a JSON config: exports in seconds, for runtime and CLI tests."""
    pytest.importorskip("open_clip")
    m = MODELS["micro-vit"]
    return _export_from_checkpoint(tmp_path_factory.mktemp("micro"), m.name, m.seed, m.config_path)


@pytest.fixture(scope="session")
def vit_b_32_artifact(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    pytest.importorskip("open_clip")
    return _export_from_checkpoint(tmp_path_factory.mktemp("vitb32"), "ViT-B-32", 1234)


@pytest.fixture(scope="session")
def rn50_artifact(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    pytest.importorskip("open_clip")
    return _export_from_checkpoint(tmp_path_factory.mktemp("rn50"), "RN50", 4321)


@pytest.fixture(scope="session")
def held_out_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real photographs from scikit-image that the exporter never saw, plus odd modes and shapes."""
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    root = tmp_path_factory.mktemp("held-out")
    paths = []
    for name in HELD_OUT_SKIMAGE:
        path = root / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(path)
        paths.append(path)
    rgba = Image.open(paths[0]).convert("RGBA")
    rgba.save(root / "rgba.png")
    Image.open(paths[1]).convert("P").save(root / "palette.png")
    Image.open(paths[2]).crop((0, 0, 1, 300)).save(root / "one-pixel-wide.png")
    Image.open(paths[3]).convert("CMYK").save(root / "cmyk.jpg")
    return paths + [root / "rgba.png", root / "palette.png", root / "one-pixel-wide.png", root / "cmyk.jpg"]
