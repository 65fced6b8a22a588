"""Torch-free image preprocessing that matches open_clip's inference transform pixel for pixel.

``open_clip.transform.image_transform(..., is_train=False)`` is a chain of torchvision transforms.
For a PIL input, torchvision delegates every step to a PIL call; this module makes the same PIL
calls, with the same arguments and in the same order, and does the final ``ToTensor`` +
``Normalize`` in float32 numpy with the same operations. The result matches open_clip bit for bit.

Nothing here may import torch, torchvision or open_clip.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

from clipdeploy.errors import ArtifactError, InputError

__all__ = ["ImageLike", "PreprocessConfig", "Preprocessor", "load_image"]

ImageLike = Union[Image.Image, str, os.PathLike, bytes, bytearray, memoryview]

INTERPOLATIONS = ("bicubic", "bilinear")
RESIZE_MODES = ("shortest", "longest", "squash")
_PIL_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_SINGLE_TYPES = (Image.Image, str, os.PathLike, bytes, bytearray, memoryview)


@dataclass(frozen=True)
class PreprocessConfig:
    """How images are turned into the model's pixel input; mirrors open_clip's ``PreprocessCfg``."""

    # Output (height, width) in pixels, the model's input resolution.
    size: tuple[int, int]
    # Per-channel RGB mean subtracted after scaling pixels to [0, 1].
    mean: tuple[float, float, float]
    # Per-channel RGB standard deviation divided by after subtracting the mean.
    std: tuple[float, float, float]
    # Resampling filter for the resize: 'bicubic' or 'bilinear'.
    interpolation: str
    # 'shortest': resize the short side then center crop; 'longest': resize the long side then
    # pad; 'squash': resize to the exact size, ignoring the aspect ratio.
    resize_mode: str
    # Pixel value (0-255, every band) used for the padding in 'longest' mode.
    fill_color: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessConfig:
        """Build and validate a config from its JSON form; raises ArtifactError on bad values."""
        if not isinstance(d, Mapping):
            raise ArtifactError(f"preprocess config: got {type(d).__name__}, expected a JSON object")
        missing = [k for k in ("size", "mean", "std", "interpolation", "resize_mode", "fill_color") if k not in d]
        if missing:
            raise ArtifactError(f"preprocess config: missing key(s) {', '.join(missing)}; re-export the artifact")

        size = d["size"]
        if _is_int(size):
            size = (size, size)
        if (
            not isinstance(size, (list, tuple))
            or len(size) != 2
            or not all(_is_int(v) and v > 0 for v in size)
        ):
            raise ArtifactError(
                f"preprocess config: size={size!r} is invalid; allowed: a positive int or [height, width] of positive ints"
            )

        mean = _three_floats(d["mean"], "mean", positive=False)
        std = _three_floats(d["std"], "std", positive=True)

        interpolation = d["interpolation"]
        # open_clip ignores 'random' at inference and uses bicubic.
        if interpolation == "random":
            interpolation = "bicubic"
        if interpolation not in INTERPOLATIONS:
            raise ArtifactError(
                f"preprocess config: interpolation={interpolation!r} is invalid; allowed: 'bicubic', 'bilinear', 'random'"
            )

        resize_mode = d["resize_mode"]
        if resize_mode not in RESIZE_MODES:
            raise ArtifactError(
                f"preprocess config: resize_mode={resize_mode!r} is invalid; allowed: 'shortest', 'longest', 'squash'"
            )

        fill_color = d["fill_color"]
        if not _is_int(fill_color) or not 0 <= fill_color <= 255:
            raise ArtifactError(
                f"preprocess config: fill_color={fill_color!r} is invalid; allowed: an int from 0 to 255"
            )

        return cls(
            size=(int(size[0]), int(size[1])),
            mean=mean,
            std=std,
            interpolation=interpolation,
            resize_mode=resize_mode,
            fill_color=int(fill_color),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form read back by ``from_dict``."""
        return {
            "size": [int(self.size[0]), int(self.size[1])],
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
            "fill_color": int(self.fill_color),
        }


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _three_floats(v: Any, key: str, positive: bool) -> tuple[float, float, float]:
    allowed = "3 positive finite numbers" if positive else "3 finite numbers"
    ok = (
        isinstance(v, (list, tuple))
        and len(v) == 3
        and all(isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) for x in v)
        and all(math.isfinite(float(x)) and (not positive or float(x) > 0) for x in v)
    )
    if not ok:
        raise ArtifactError(f"preprocess config: {key}={v!r} is invalid; allowed: a list of {allowed}")
    return (float(v[0]), float(v[1]), float(v[2]))


def load_image(x: ImageLike, label: str | None = None, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open a path or encoded bytes as a fully decoded PIL image; PIL images pass through.

    ``label`` names the input in error messages (defaults to the path, or "image bytes").
    ``draft`` (width, height): let a JPEG decode at 1/2, 1/4 or 1/8 scale while it stays at least
    this size (Pillow's draft mode; approximate pixels, opt-in). No EXIF transposition, as in open_clip.
    """
    expected = "expected a readable image file (e.g. JPEG, PNG, WebP)"
    if isinstance(x, Image.Image):
        name = label or "PIL image"
        try:
            _draft(x, draft)
            x.load()
        except Exception as e:  # PIL raises many types for broken data
            raise InputError(f"{name} could not be decoded ({_reason(e)}); {expected}") from e
        return x

    if isinstance(x, (bytes, bytearray, memoryview)):
        name = label or "image bytes"
        data = bytes(x)
        if not data:
            raise InputError(f"{name} is empty (0 bytes); {expected}")
        try:
            img = Image.open(io.BytesIO(data))
            _draft(img, draft)
            img.load()
        except Exception as e:
            raise InputError(f"{name} is not a readable image ({_reason(e)}); {expected}") from e
        return img

    if isinstance(x, (str, os.PathLike)):
        path = os.fspath(x)
        name = label or f"image file {path!r}"
        if not os.path.exists(path):
            raise InputError(f"{name} does not exist; {expected}, check the path")
        if os.path.isdir(path):
            raise InputError(f"{name} is a directory; {expected}")
        try:
            # Read through our own handle so the file is closed even for multi-frame images.
            with open(path, "rb") as f:
                img = Image.open(f)
                _draft(img, draft)
                img.load()
        except Exception as e:
            raise InputError(f"{name} is not a readable image ({_reason(e)}); {expected}") from e
        return img

    raise InputError(
        f"{label or 'image'} has type {_type_name(x)}; "
        "expected a PIL.Image.Image, a file path (str or os.PathLike) or encoded image bytes"
    )


def _draft(img: Image.Image, size: tuple[int, int] | None) -> None:
    # A no-op for non-JPEG and already-decoded images; the mode is kept so only the scale changes.
    if size is not None and img.format == "JPEG":
        img.draft(img.mode, size)


def _reason(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class Preprocessor:
    """Turns images into the normalized float32 ``[N, 3, H, W]`` batch the image encoder takes."""

    def __init__(self, cfg: PreprocessConfig, *, fast_decode: bool = False) -> None:
        self.cfg = cfg
        # Default for __call__/one: decode large JPEGs at a reduced scale (not open_clip's exact pixels).
        self.fast_decode = fast_decode
        self._resample = _PIL_RESAMPLE[cfg.interpolation]
        # Same conversion as torch.as_tensor(mean, dtype=float32) in torchvision's normalize.
        self._mean = np.asarray(cfg.mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(cfg.std, dtype=np.float32).reshape(3, 1, 1)

    def __call__(self, images: Sequence[ImageLike] | ImageLike, *, fast_decode: bool | None = None) -> np.ndarray:
        """Load and transform one image or a sequence of them into a C-contiguous float32 batch.

        ``fast_decode=True`` decodes JPEGs at least twice the model's input size at 1/2, 1/4 or 1/8
        scale (faster, close to but not exactly open_clip's pixels); None takes the constructor's setting.
        """
        if isinstance(images, _SINGLE_TYPES) or not isinstance(images, Sequence):
            items: list[Any] = [images]
        else:
            items = list(images)
        if not items:
            raise InputError("got an empty list of images; expected at least one image")
        h, w = self.cfg.size
        out = np.empty((len(items), 3, h, w), dtype=np.float32)
        for i, item in enumerate(items):
            out[i] = self.one(item, i, fast_decode=fast_decode)
        return out

    def one(self, item: ImageLike, index: int = 0, *, fast_decode: bool | None = None) -> np.ndarray:
        """Load and transform one input into ``[3, H, W]``; ``index`` is its position, named in errors."""
        fast = self.fast_decode if fast_decode is None else fast_decode
        draft = (self.cfg.size[1], self.cfg.size[0]) if fast else None
        return self.transform_one(load_image(item, _label(item, index), draft=draft))

    def transform_one(self, img: Image.Image) -> np.ndarray:
        """Transform one PIL image into a float32 ``[3, H, W]`` array."""
        cfg = self.cfg
        if not isinstance(img, Image.Image):
            raise InputError(f"transform_one got {_type_name(img)}; expected a PIL.Image.Image")
        if img.width < 1 or img.height < 1:
            raise InputError(f"image has size {img.width}x{img.height}; expected at least 1x1 pixels")

        target_h, target_w = cfg.size
        if cfg.resize_mode == "longest":
            img = _resize(img, _keep_ratio_size(img, cfg.size, longest=1.0), self._resample)
            img = _center_crop_or_pad(img, cfg.size, fill=cfg.fill_color)
        elif cfg.resize_mode == "squash":
            img = _resize(img, [target_h, target_w], self._resample)
        else:
            if target_h == target_w:
                img = _resize(img, _shortest_edge_size(img, target_h), self._resample)
            else:
                # open_clip builds ResizeKeepRatio(image_size) here without passing the
                # interpolation, so it is always bicubic for non-square targets.
                img = _resize(img, _keep_ratio_size(img, cfg.size, longest=0.0), Image.Resampling.BICUBIC)
            # torchvision's CenterCrop always pads with 0.
            img = _center_crop_or_pad(img, cfg.size, fill=0)

        # MaybeConvertMode: after resize/crop, like open_clip.
        img = img.convert("RGB")
        # ToTensor: uint8 HWC -> float32 CHW / 255; then Normalize: (x - mean) / std in float32.
        arr = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32, order="C")
        arr /= np.float32(255)
        arr -= self._mean
        arr /= self._std
        return np.ascontiguousarray(arr)


def _label(item: Any, i: int) -> str:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"image bytes #{i}"
    if isinstance(item, (str, os.PathLike)):
        return f"image file {os.fspath(item)!r} (#{i})"
    if isinstance(item, Image.Image):
        return f"PIL image #{i}"
    return f"image #{i}"


def _resize(img: Image.Image, size: list[int], resample: int) -> Image.Image:
    """torchvision.transforms.functional.resize for PIL: size is [h, w]; no-op when unchanged."""
    if [img.height, img.width] == size:
        return img
    if size[0] < 1 or size[1] < 1:
        # open_clip fails here too, inside PIL (ValueError: height and width must be > 0).
        raise InputError(
            f"image of {img.width}x{img.height} pixels is too thin: resizing it would give "
            f"{size[1]}x{size[0]} pixels; expected an aspect ratio the model's resize can keep"
        )
    # PIL always antialiases bilinear/bicubic downscaling, whatever torchvision's antialias says,
    # and itself switches 'P' and '1' images to NEAREST.
    return img.resize((size[1], size[0]), resample)


def _shortest_edge_size(img: Image.Image, size: int) -> list[int]:
    """torchvision's _compute_resized_output_size for an int size (short side = size)."""
    h, w = img.height, img.width
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return [new_h, new_w]


def _keep_ratio_size(img: Image.Image, target: tuple[int, int], longest: float) -> list[int]:
    """open_clip ResizeKeepRatio.get_params without the random parts; same float expressions."""
    h, w = img.height, img.width
    target_h, target_w = target
    ratio_h = h / target_h
    ratio_w = w / target_w
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return [round(x * 1.0 / ratio) for x in (h, w)]


def _center_crop_or_pad(img: Image.Image, output_size: tuple[int, int], fill: int) -> Image.Image:
    """torchvision center_crop / open_clip center_crop_or_pad for PIL images."""
    crop_h, crop_w = output_size
    image_w, image_h = img.size
    if crop_w > image_w or crop_h > image_h:
        padding_ltrb = (
            (crop_w - image_w) // 2 if crop_w > image_w else 0,
            (crop_h - image_h) // 2 if crop_h > image_h else 0,
            (crop_w - image_w + 1) // 2 if crop_w > image_w else 0,
            (crop_h - image_h + 1) // 2 if crop_h > image_h else 0,
        )
        img = _pad_constant(img, padding_ltrb, fill)
        image_w, image_h = img.size
        if crop_w == image_w and crop_h == image_h:
            return img
    crop_top = int(round((image_h - crop_h) / 2.0))
    crop_left = int(round((image_w - crop_w) / 2.0))
    return img.crop((crop_left, crop_top, crop_left + crop_w, crop_top + crop_h))


def _pad_constant(img: Image.Image, padding_ltrb: tuple[int, int, int, int], fill: int) -> Image.Image:
    """torchvision _functional_pil.pad with padding_mode='constant'."""
    # _parse_fill: one value per band, ints unless the image is float.
    bands = len(img.getbands())
    fill_value: Any = tuple([fill] * bands) if bands > 1 else fill
    if img.mode != "F":
        fill_value = tuple(int(v) for v in fill_value) if isinstance(fill_value, tuple) else int(fill_value)
    if img.mode == "P":
        palette = img.getpalette()
        out = ImageOps.expand(img, border=padding_ltrb, fill=fill_value)
        out.putpalette(palette)
        return out
    return ImageOps.expand(img, border=padding_ltrb, fill=fill_value)


def _type_name(x: Any) -> str:
    t = type(x)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
