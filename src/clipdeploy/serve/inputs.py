"""Request items to model inputs: strings stay texts; images come as base64 or data: URLs, never URLs.

An image item is ``{"image": "<base64 or data: URL>"}`` (Jina-style), or, with the request's
``"modality": "image"`` (infinity's convention), every string is one. Nothing is fetched from the
network on a client's behalf: an http(s) URL is refused, so the server cannot be made to reach
anything (no SSRF). Decoding checks the image's size from its header before it decodes a pixel, so a
decompression bomb is refused without using its memory.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from clipdeploy.errors import InputError
from clipdeploy.runtime.preprocess import Preprocessor
from clipdeploy.serve.errors import APIError, bad_request, too_large

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


_WHITESPACE = {ord(c): None for c in " \t\n\r\v\f"}

# The formats a client may send: the common ones, not every format Pillow can parse.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


@dataclass(frozen=True)
class Item:
    """One input of a request: its place in the request, and a text or an image's encoded bytes."""

    index: int
    text: str | None = None
    image: bytes | None = None


def split_input(raw: Any, modality: str | None, max_items: int) -> list[Item]:
    """The request's ``input`` as items in order; a 400 naming the item for anything unusable."""
    items_in = [raw] if isinstance(raw, (str, dict)) else raw
    if not isinstance(items_in, list):
        raise bad_request("'input' must be a string, an image item, or a list of them", param="input")
    if not items_in:
        raise bad_request("'input' is an empty list; send at least one string or image", param="input")
    if len(items_in) > max_items:
        raise bad_request(f"'input' has {len(items_in)} items, more than this server's limit of {max_items}; "
                          "split the request", param="input", code="too_many_items")  # fmt: skip
    if all(isinstance(x, int) and not isinstance(x, bool) for x in items_in) or any(
        isinstance(x, list) for x in items_in
    ):
        raise bad_request(
            "'input' holds token ids; this server tokenizes text itself with the model's own tokenizer "
            "(ids from another tokenizer would mean other tokens): send the strings instead",
            param="input", code="token_ids_not_supported",
        )  # fmt: skip
    out = []
    for i, x in enumerate(items_in):
        if isinstance(x, str):
            if modality == "image":
                out.append(Item(i, image=decode_base64(x, i)))
            else:
                out.append(Item(i, text=x))
        elif isinstance(x, dict):
            out.append(Item(i, image=_image_item(x, i)))
        else:
            raise bad_request(f"input[{i}] is {type(x).__name__}; expected a string or {{\"image\": \"<base64>\"}}",
                              param=f"input[{i}]")  # fmt: skip
    return out


def _image_item(x: dict[str, Any], i: int) -> bytes:
    extra = sorted(set(x) - {"image"})
    if "image" not in x or extra:
        raise bad_request(f"input[{i}] has key(s) {', '.join(sorted(x)) or 'none'}; an image item is "
                          "{\"image\": \"<base64 or data: URL>\"}", param=f"input[{i}]")  # fmt: skip
    if not isinstance(x["image"], str):
        raise bad_request(f"input[{i}].image is {type(x['image']).__name__}; send the image as a base64 string",
                          param=f"input[{i}]")  # fmt: skip
    return decode_base64(x["image"], i)


def decode_base64(s: str, i: int, param: str | None = None) -> bytes:
    """A base64 string or a ``data:...;base64,`` URL to bytes; a 400 naming the item otherwise."""
    param = param or f"input[{i}]"
    s = s.translate(_WHITESPACE)  # MIME-style line breaks, as `base64` writes them (no copy per piece)
    if s[:8].lower().startswith(("http://", "https://", "ftp://", "file:")):
        raise bad_request(f"{param} is a URL; this server fetches nothing on a client's behalf: "
                          "send the image bytes as base64 or a data: URL", param=param, code="url_not_supported")  # fmt: skip
    m = _DATA_URL.match(s)
    if m:
        if not m["b64"]:
            raise bad_request(f"{param} is a data: URL without ';base64'; send base64-encoded image bytes", param=param)
        s = s[m.end():]
    try:
        data = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        # urlsafe alphabet, or missing padding, as some clients send
        try:
            data = base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
        except (binascii.Error, ValueError):
            raise bad_request(f"{param} is not valid base64; send the image file's bytes base64-encoded",
                              param=param, code="invalid_base64") from None  # fmt: skip
        if base64.urlsafe_b64encode(data).rstrip(b"=") != s.rstrip("=").encode():
            raise bad_request(f"{param} is not valid base64; send the image file's bytes base64-encoded",
                              param=param, code="invalid_base64")  # fmt: skip
    if not data:
        raise bad_request(f"{param} is empty; send the image file's bytes base64-encoded", param=param)
    return data


def decode_image(pre: Preprocessor, data: bytes, i: int, max_pixels: int, param: str | None = None) -> np.ndarray:
    """Encoded image bytes to the model's float32 ``[3, H, W]`` pixels; a 4xx naming the item otherwise."""
    param = param or f"input[{i}]"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            w, h = img.size  # from the header: nothing decoded yet
            if w * h > max_pixels:
                raise too_large(f"{param} is {w}x{h} = {w * h} pixels, more than this server's limit of "
                                f"{max_pixels}; resize it before sending", param=param)  # fmt: skip
            img.load()
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise too_large(f"{param} is too large to decode ({e}); resize it before sending", param=param) from None
    except Exception as e:  # PIL raises many types for data that is not an image
        reason = " ".join(str(e).split()) or type(e).__name__
        raise bad_request(f"{param} is not a readable image ({reason}); send a JPEG, PNG or WebP file's bytes",
                          param=param, code="invalid_image") from None  # fmt: skip
    try:
        return pre.transform_one(img)
    except InputError as e:
        raise bad_request(f"{param}: {e}", param=param, code="invalid_image") from None
    except Exception as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise bad_request(f"{param} could not be decoded ({reason}); send a JPEG, PNG or WebP file's bytes",
                          param=param, code="invalid_image") from None  # fmt: skip
