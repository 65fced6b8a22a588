"""A small dataset for embed-dataset: a folder and a tar shard with nested paths, odd image modes and sizes,
captions beside tar images, and three corrupt items; plus the tiny torch-free artifact."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

CORRUPT = {("folder", "nested/deeper/truncated.jpg"), ("folder", "empty.png"), ("tar", "sub/garbage")}


@dataclass
class Dataset:
    folder: Path
    tar: Path
    readable: dict[tuple[str, str], bytes]  # (source kind, key) -> encoded bytes
    captions: dict[str, str]  # tar key -> caption


def _encode(img, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.tiny_artifact import tiny_artifact_or_skip

    return tiny_artifact_or_skip(tmp_path_factory.mktemp("bulk-art") / "art")


@pytest.fixture(scope="session")
def other_art(tmp_path_factory: pytest.TempPathFactory, tiny_art: Path) -> Path:
    import json
    import shutil

    other = tmp_path_factory.mktemp("bulk-other") / "art"
    shutil.copytree(tiny_art, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["model"]["logit_scale"] = 50.0  # another artifact: its manifest differs
    (other / "manifest.json").write_text(json.dumps(manifest))
    return other


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    from PIL import Image

    root = tmp_path_factory.mktemp("bulk-data")
    folder, readable = root / "images", {}
    images = {
        "a.png": (Image.new("RGB", (40, 30), (200, 10, 10)), "PNG"),
        "gray.jpg": (Image.linear_gradient("L").resize((64, 20)), "JPEG"),
        "nested/rgba.png": (Image.new("RGBA", (17, 51), (0, 90, 200, 128)), "PNG"),
        "nested/pal.gif": (Image.new("P", (33, 33), 3), "GIF"),
        "nested/deeper/cmyk.jpg": (Image.new("CMYK", (50, 40), (10, 80, 0, 20)), "JPEG"),
        "nested/deeper/one.png": (Image.new("RGB", (1, 1), (5, 250, 5)), "PNG"),
        "nested/deeper/wide.bmp": (Image.linear_gradient("L").convert("RGB").resize((300, 7)), "BMP"),
    }
    for key, (img, fmt) in images.items():
        data = _encode(img, fmt)
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        (folder / key).write_bytes(data)
        readable[("folder", key)] = data
    good = _encode(Image.linear_gradient("L").convert("RGB").resize((80, 60)), "JPEG")
    (folder / "nested/deeper/truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.md").write_text("not an image: not an item")

    tar_path, captions = root / "shard-000.tar", {}
    members = {}
    for i in range(5):
        key = f"sub/s{i:02d}" if i % 2 else f"s{i:02d}"
        img = Image.new("LA" if i == 3 else "RGB", (20 + 9 * i, 40 - 5 * i), (30 * i, 200 - 20 * i) if i == 3 else (30 * i, 90, 200 - 20 * i))
        data = _encode(img, "PNG")
        members[f"{key}.png"] = data
        readable[("tar", key)] = data
        if i != 2:
            members[f"{key}.txt"] = f"caption {i}".encode()
            captions[key] = f"caption {i}"
    members["sub/garbage.jpg"] = b"\xff\xd8\xff this is no jpeg"
    members["sub/garbage.txt"] = b"a caption for a broken image"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return Dataset(folder, tar_path, readable, captions)
