"""encode_image's threaded preprocessing and the opt-in fast JPEG decode, on the micro ViT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import clipdeploy
from clipdeploy.errors import InputError, UsageError

pytest.importorskip("onnxruntime")
Image = pytest.importorskip("PIL.Image")

SAMPLES = sorted((Path(clipdeploy.__file__).parent / "data" / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def session(micro_artifact):
    return clipdeploy.load(micro_artifact.path, backend="onnxruntime", intra_op_num_threads=1)


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory) -> list[Path]:
    """The bundled photos upscaled to ~1.9 MP JPEGs: 1/8-scale draft decodes still cover 64 px."""
    root = tmp_path_factory.mktemp("large")
    out = []
    for p in SAMPLES:
        img = Image.open(p).convert("RGB").resize((1600, 1200), Image.Resampling.BICUBIC)
        dst = root / f"{p.stem}.jpg"
        img.save(dst, quality=92)
        out.append(dst)
    return out


def test_overlapped_is_byte_identical_to_sequential(session):
    items = [*SAMPLES, *SAMPLES[:3]]  # 11 items: 4 batches of 3, the last one short
    sequential = session.encode_image(items, batch_size=3, workers=1)
    for workers in (2, 4):
        overlapped = session.encode_image(items, batch_size=3, workers=workers)
        assert overlapped.tobytes() == sequential.tobytes()
    # Order is kept: the same file gives the same row wherever it sits.
    assert sequential[8].tobytes() == sequential[0].tobytes()
    assert not np.array_equal(sequential[0], sequential[1])


def test_overlapped_error_names_the_bad_item(session, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    items = [*SAMPLES[:5], bad, *SAMPLES[:2]]
    for workers in (1, 3):
        with pytest.raises(InputError, match=r"broken\.jpg.*\(#5\)"):
            session.encode_image(items, batch_size=2, workers=workers)


def test_workers_must_be_positive(session):
    with pytest.raises(UsageError, match="workers=0"):
        session.encode_image(SAMPLES, batch_size=2, workers=0)


def test_fast_decode_is_opt_in_and_close(session, large_jpegs):
    exact = session.preprocess(large_jpegs)
    assert np.array_equal(exact, session._preprocessor(large_jpegs))  # the default stays exact
    fast = session.preprocess(large_jpegs, fast_decode=True)
    assert not np.array_equal(fast, exact)  # draft mode really decoded at a reduced scale
    e_exact = session.encode_image(large_jpegs, batch_size=3)
    e_fast = session.encode_image(large_jpegs, batch_size=3, fast_decode=True)
    cosines = np.sum(e_exact * e_fast, axis=1)  # both L2-normalized
    print(f"fast_decode cosine vs exact: min {cosines.min():.5f} mean {cosines.mean():.5f}")
    assert cosines.min() >= 0.99


def test_fast_decode_leaves_small_and_non_jpeg_images_exact(session, tmp_path):
    png = tmp_path / "big.png"
    Image.open(SAMPLES[0]).convert("RGB").resize((800, 600)).save(png)
    small = tmp_path / "small.jpg"
    Image.open(SAMPLES[0]).convert("RGB").resize((100, 90)).save(small)  # under twice 64 px: scale 1
    for p in (png, small):
        assert np.array_equal(session.preprocess([p], fast_decode=True), session.preprocess([p]))
