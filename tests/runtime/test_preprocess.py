"""The torch-free preprocessor against open_clip's own inference transform, plus its error paths.

Parity is checked on seeded noise and smooth-gradient images generated here, in every PIL mode
open_clip accepts, at sizes that hit each branch: upscaling, downscaling, the no-op resize, the
padding when the image is smaller than the crop, 1-pixel-wide and 1-pixel-tall images.
"""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from clipdeploy.errors import ArtifactError, InputError
from clipdeploy.runtime.preprocess import PreprocessConfig, Preprocessor, load_image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TOLERANCE = 1e-5
MODES = ("RGB", "RGBA", "L", "LA", "P", "I", "I;16", "F", "CMYK", "1", "YCbCr")
SRC = Path(__file__).resolve().parents[2] / "src"


# --- image and config generation -------------------------------------------------------------


def _field(w: int, h: int, bands: int, kind: str, seed: int) -> np.ndarray:
    """Values in [0, 1), shape (h, w, bands): seeded noise or smooth diagonal waves."""
    if kind == "noise":
        return np.random.default_rng(seed).random((h, w, bands))
    y = np.linspace(0.0, 1.0, h)[:, None, None]
    x = np.linspace(0.0, 1.0, w)[None, :, None]
    k = np.arange(bands)[None, None, :]
    return 0.5 + 0.499 * np.sin(2 * np.pi * (x * (1 + k) + y * (2 - 0.5 * k)) + k)


@functools.lru_cache(maxsize=None)
def make_image(mode: str, w: int, h: int, kind: str = "noise", seed: int = 0) -> Image.Image:
    """A seeded test image of the given PIL mode and (width, height)."""
    if mode in ("RGB", "YCbCr", "RGBA", "CMYK", "LA", "L"):
        bands = {"RGB": 3, "YCbCr": 3, "RGBA": 4, "CMYK": 4, "LA": 2, "L": 1}[mode]
        data = (_field(w, h, bands, kind, seed) * 256).astype(np.uint8)
        return Image.frombytes(mode, (w, h), data.tobytes())
    f = _field(w, h, 1, kind, seed)[:, :, 0]
    if mode == "P":
        img = Image.frombytes("P", (w, h), (f * 256).astype(np.uint8).tobytes())
        img.putpalette(np.random.default_rng(seed + 1).integers(0, 256, 768, dtype=np.uint8).tobytes())
        return img
    if mode == "1":
        return Image.fromarray(f > 0.5)
    # Ranges past 0..255 exercise PIL's clipping in the final convert("RGB").
    if mode == "I":
        return Image.frombytes("I", (w, h), (f * 600 - 100).astype("<i4").tobytes())
    if mode == "I;16":
        return Image.frombytes("I;16", (w, h), (f * 500).astype("<u2").tobytes())
    if mode == "F":
        return Image.frombytes("F", (w, h), (f * 450 - 50).astype("<f4").tobytes())
    raise AssertionError(mode)


def make_cfg(
    size: tuple[int, int],
    interpolation: str = "bicubic",
    resize_mode: str = "shortest",
    fill_color: int = 0,
    mean: tuple[float, float, float] = OPENAI_MEAN,
    std: tuple[float, float, float] = OPENAI_STD,
) -> PreprocessConfig:
    return PreprocessConfig(size, mean, std, interpolation, resize_mode, fill_color)


def _config_matrix(sizes: list[tuple[int, int]]) -> list[PreprocessConfig]:
    cfgs = [
        make_cfg(size, interp, mode)
        for size in sizes
        for mode in ("shortest", "longest", "squash")
        for interp in ("bicubic", "bilinear")
    ]
    cfgs += [make_cfg(size, "bicubic", "longest", fill_color=117) for size in sizes]
    return cfgs


def _cfg_id(cfg: PreprocessConfig) -> str:
    return f"{cfg.size[0]}x{cfg.size[1]}-{cfg.resize_mode}-{cfg.interpolation}-fill{cfg.fill_color}"


# Small targets so the full mode x config x shape matrix stays fast; every branch is still hit.
SMALL_CONFIGS = _config_matrix([(16, 16), (20, 12), (12, 20)])
# (width, height): 1x1, 1-px wide/tall, too thin for 'longest', smaller than the crop, exact, odd.
SMALL_SHAPES = [(1, 1), (1, 29), (29, 1), (1, 200), (200, 1), (5, 7), (15, 16), (16, 16),
                (12, 20), (33, 21), (21, 47), (100, 75)]
FULL_CONFIGS = _config_matrix([(224, 224), (256, 192)])
FULL_SHAPES = [(1, 300), (300, 1), (7, 5), (150, 100), (223, 225), (224, 224), (192, 256),
               (640, 480), (480, 640), (1000, 333)]


# --- reference -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_clip():
    oc = pytest.importorskip("open_clip")
    import torch

    # OpenMP spinning on a busy 2-core box makes tiny torch ops 100x slower; one thread is exact too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield oc
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _reference(cfg: PreprocessConfig):
    from open_clip.transform import image_transform

    return image_transform(
        cfg.size, is_train=False, mean=cfg.mean, std=cfg.std, resize_mode=cfg.resize_mode,
        interpolation=cfg.interpolation, fill_color=cfg.fill_color,
    )


def _compare(cfg: PreprocessConfig, images: list[tuple[str, Image.Image]]) -> tuple[float, list[str]]:
    """Worst max-abs difference over the images, and any disagreement described."""
    ref, ours = _reference(cfg), Preprocessor(cfg)
    worst, problems = 0.0, []
    for name, img in images:
        try:
            expected = ref(img).numpy()
        except ValueError as e:
            # PIL refuses a 0-pixel side; open_clip fails, we must fail too, with InputError.
            with pytest.raises(InputError, match="too thin"):
                ours.transform_one(img)
            assert "height and width must be > 0" in str(e), (name, e)
            continue
        got = ours.transform_one(img)
        if got.shape != expected.shape or got.dtype != np.float32:
            problems.append(f"{name}: shape {got.shape} {got.dtype}, expected {expected.shape} float32")
            continue
        diff = float(np.abs(got - expected).max())
        worst = max(worst, diff)
        if diff > TOLERANCE:
            problems.append(f"{name}: max abs diff {diff:.3g}")
    return worst, problems


# --- parity ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_parity_every_mode_small_targets(open_clip, mode):
    images = [
        (f"{mode} {w}x{h} {kind}", make_image(mode, w, h, kind, seed=i))
        for i, (w, h) in enumerate(SMALL_SHAPES)
        for kind in ("noise", "gradient")
    ]
    worst, problems = 0.0, []
    for cfg in SMALL_CONFIGS:
        w_, p_ = _compare(cfg, images)
        worst = max(worst, w_)
        problems += [f"{_cfg_id(cfg)} {p}" for p in p_]
    assert not problems, f"measured max abs diff {worst:.3g}; " + "; ".join(problems[:10])
    assert worst <= TOLERANCE, f"measured max abs diff {worst:.3g}"


@pytest.mark.parametrize("cfg", FULL_CONFIGS, ids=_cfg_id)
def test_parity_model_sized_targets(open_clip, cfg):
    images = [
        (f"RGB {w}x{h} {kind}", make_image("RGB", w, h, kind, seed=i))
        for i, (w, h) in enumerate(FULL_SHAPES)
        for kind in (("noise", "gradient") if w * h < 200_000 else ("gradient",))
    ]
    images += [(f"{m} 320x240", make_image(m, 320, 240, "gradient", seed=5)) for m in ("RGBA", "P", "L", "1")]
    worst, problems = _compare(cfg, images)
    assert not problems, f"measured max abs diff {worst:.3g}; " + "; ".join(problems)
    assert worst <= TOLERANCE, f"measured max abs diff {worst:.3g}"


def test_non_square_shortest_ignores_interpolation_like_open_clip(open_clip):
    # open_clip's non-square 'shortest' path builds ResizeKeepRatio without the interpolation.
    img = make_image("RGB", 300, 200, "noise", seed=3)
    bilinear = Preprocessor(make_cfg((256, 192), "bilinear")).transform_one(img)
    bicubic = Preprocessor(make_cfg((256, 192), "bicubic")).transform_one(img)
    np.testing.assert_array_equal(bilinear, bicubic)
    np.testing.assert_array_equal(bilinear, _reference(make_cfg((256, 192), "bilinear"))(img).numpy())


def test_too_thin_image_fails_like_open_clip(open_clip):
    cfg = make_cfg((224, 224), resize_mode="longest")
    img = make_image("RGB", 1, 1000)
    with pytest.raises(ValueError, match="height and width must be > 0"):
        _reference(cfg)(img)
    with pytest.raises(InputError, match=r"1x1000 pixels is too thin") as e:
        Preprocessor(cfg).transform_one(img)
    assert "\n" not in str(e.value)


def test_batch_matches_single_images(open_clip):
    cfg = make_cfg((224, 224))
    imgs = [make_image("RGB", 640, 480, "gradient"), make_image("L", 100, 300), make_image("P", 224, 224)]
    batch = Preprocessor(cfg)(imgs)
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == np.float32 and batch.flags.c_contiguous
    for i, img in enumerate(imgs):
        np.testing.assert_array_equal(batch[i], _reference(cfg)(img).numpy())


# --- Preprocessor call forms -----------------------------------------------------------------


def _png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_single_image_and_mixed_inputs(tmp_path):
    cfg = make_cfg((32, 24))
    pp = Preprocessor(cfg)
    img = make_image("RGB", 50, 40, "gradient")
    path = tmp_path / "a.png"
    img.save(path)
    data = _png_bytes(img)

    single = pp(img)
    assert single.shape == (1, 3, 32, 24) and single.dtype == np.float32 and single.flags.c_contiguous
    for x in (str(path), path, data, bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(pp(x), single)
    batch = pp((path, data, img))
    assert batch.shape == (3, 3, 32, 24) and batch.flags.c_contiguous
    for row in batch:
        np.testing.assert_array_equal(row, single[0])
    np.testing.assert_array_equal(pp.transform_one(img), single[0])


def test_load_image_forms(tmp_path):
    img = make_image("RGBA", 20, 10)
    path = tmp_path / "x.png"
    img.save(path)
    for x in (path, str(path), _png_bytes(img)):
        loaded = load_image(x)
        assert loaded.mode == "RGBA" and loaded.size == (20, 10)
        assert np.array_equal(np.asarray(loaded), np.asarray(img))
    assert load_image(img) is img


def test_load_image_does_not_apply_exif_orientation(tmp_path):
    img = make_image("RGB", 30, 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW" orientation
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    assert load_image(path).size == (30, 10)


# --- errors ----------------------------------------------------------------------------------


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_corrupt_file(tmp_path):
    path = tmp_path / "garbage.jpg"
    path.write_bytes(b"this is not a jpeg at all" * 10)
    with pytest.raises(InputError) as e:
        load_image(path)
    msg = _one_line(e)
    assert "garbage.jpg" in msg and "readable image" in msg and "JPEG" in msg


def test_truncated_jpeg_file_and_bytes(tmp_path):
    data = _png_bytes(make_image("RGB", 200, 150, "noise"), "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as e:
        load_image(path)
    assert "cut.jpg" in _one_line(e)
    with pytest.raises(InputError) as e:
        Preprocessor(make_cfg((16, 16)))([make_image("RGB", 5, 5), data[: len(data) // 2]])
    assert "image bytes #1" in _one_line(e)


def test_missing_file(tmp_path):
    with pytest.raises(InputError) as e:
        load_image(tmp_path / "nope.png")
    msg = _one_line(e)
    assert "nope.png" in msg and "does not exist" in msg


def test_directory_and_empty_bytes(tmp_path):
    with pytest.raises(InputError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(InputError, match="empty"):
        load_image(b"")


@pytest.mark.parametrize("bad", [42, None, 3.5, np.zeros((4, 4, 3), np.uint8)])
def test_wrong_type(bad):
    with pytest.raises(InputError) as e:
        load_image(bad)
    assert type(bad).__name__ in _one_line(e)
    with pytest.raises(InputError) as e:
        Preprocessor(make_cfg((16, 16)))([make_image("RGB", 5, 5), bad])
    assert type(bad).__name__ in _one_line(e) and "#1" in str(e.value)


@pytest.mark.parametrize("empty", [[], ()])
def test_empty_batch(empty):
    with pytest.raises(InputError, match="empty"):
        Preprocessor(make_cfg((16, 16)))(empty)


# --- config ----------------------------------------------------------------------------------


def test_config_round_trip():
    cfg = make_cfg((256, 192), "bilinear", "longest", fill_color=9, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    d = cfg.to_dict()
    assert d == {
        "size": [256, 192], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 1.0],
        "interpolation": "bilinear", "resize_mode": "longest", "fill_color": 9,
    }
    assert PreprocessConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert PreprocessConfig.from_dict({**d, "size": 224, "interpolation": "random"}) == make_cfg(
        (224, 224), "bicubic", "longest", 9, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0)
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("size", 0), ("size", [224]), ("size", "224"), ("size", [224, -1]), ("size", True),
        ("mean", [0.5, 0.5]), ("mean", "0.5"), ("std", [0.0, 1.0, 1.0]), ("std", [float("nan"), 1, 1]),
        ("interpolation", "nearest"), ("resize_mode", "crop"),
        ("fill_color", 256), ("fill_color", -1), ("fill_color", 1.5),
    ],
)
def test_config_bad_values(key, value):
    d = make_cfg((224, 224)).to_dict()
    d[key] = value
    with pytest.raises(ArtifactError) as e:
        PreprocessConfig.from_dict(d)
    msg = _one_line(e)
    assert key in msg and "allowed" in msg


def test_config_missing_key_and_not_a_dict():
    d = make_cfg((224, 224)).to_dict()
    del d["resize_mode"]
    with pytest.raises(ArtifactError, match="resize_mode"):
        PreprocessConfig.from_dict(d)
    with pytest.raises(ArtifactError, match="list"):
        PreprocessConfig.from_dict([1, 2])  # type: ignore[arg-type]


# --- describe_preprocess ---------------------------------------------------------------------


def test_describe_preprocess_vit_b_32(open_clip):
    from clipdeploy.export.preprocess_assets import describe_preprocess

    model = open_clip.create_model("ViT-B-32")
    assert describe_preprocess(model) == {
        "size": [224, 224], "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
        "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0,
    }


def test_describe_preprocess_rn50_matches_create_model_and_transforms(open_clip):
    from clipdeploy.export.preprocess_assets import describe_preprocess

    model, _, preprocess_val = open_clip.create_model_and_transforms("RN50")
    pp = Preprocessor(PreprocessConfig.from_dict(describe_preprocess(model)))
    for img in (make_image("RGB", 333, 500, "gradient"), make_image("P", 100, 60), make_image("RGB", 1, 300)):
        diff = float(np.abs(pp(img)[0] - preprocess_val(img).numpy()).max())
        assert diff <= TOLERANCE, f"measured max abs diff {diff:.3g}"


@pytest.mark.parametrize(
    "model_cfg",
    [
        {"size": 96, "interpolation": "random", "resize_mode": "longest", "fill_color": 40,
         "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.3, 0.4)},
        {"size": (64, 48), "interpolation": "bilinear", "resize_mode": "squash", "mean": None},
        {"size": [48, 64], "resize_mode": "shortest", "interpolation": "bilinear"},
    ],
)
def test_describe_preprocess_overrides_match_image_transform_v2(open_clip, model_cfg):
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    from clipdeploy.export.preprocess_assets import describe_preprocess

    model = SimpleNamespace(visual=SimpleNamespace(preprocess_cfg=dict(model_cfg)))
    d = describe_preprocess(model)
    ref = image_transform_v2(PreprocessCfg(**merge_preprocess_dict(PreprocessCfg(), model_cfg)), is_train=False)
    pp = Preprocessor(PreprocessConfig.from_dict(d))
    for img in (make_image("RGB", 200, 90, "gradient"), make_image("LA", 31, 77)):
        diff = float(np.abs(pp(img)[0] - ref(img).numpy()).max())
        assert diff <= TOLERANCE, f"{d}: measured max abs diff {diff:.3g}"


def test_describe_preprocess_legacy_attributes(open_clip):
    from clipdeploy.export.preprocess_assets import describe_preprocess

    visual = SimpleNamespace(image_size=(336, 336), image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    d = describe_preprocess(SimpleNamespace(visual=visual))
    assert d["size"] == [336, 336] and d["mean"] == [0.5] * 3 and d["interpolation"] == "bicubic"


# --- the runtime stays torch-free ------------------------------------------------------------


def test_preprocess_never_imports_torch(tmp_path):
    img_path = tmp_path / "x.png"
    make_image("RGB", 64, 48, "gradient").save(img_path)
    code = textwrap.dedent(
        f"""
        import sys, importlib.abc
        HEAVY = ("torch", "torchvision", "open_clip")
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in HEAVY:
                    raise ImportError("blocked heavy import: " + name)
        sys.meta_path.insert(0, Block())
        from clipdeploy.runtime.preprocess import PreprocessConfig, Preprocessor
        cfg = PreprocessConfig.from_dict({make_cfg((224, 224), resize_mode="longest").to_dict()!r})
        out = Preprocessor(cfg)([{str(img_path)!r}, open({str(img_path)!r}, "rb").read()])
        assert out.shape == (2, 3, 224, 224), out.shape
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
        assert not heavy, heavy
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
