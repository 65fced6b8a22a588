"""The TensorRT backend's CUDA runtime on a real GPU, with TensorRT replaced by an engine that does real CUDA work.

This checks our side on the GPU, wherever a GPU and cuda-python exist, TensorRT or not: pinned and
device buffers, copies, per-thread streams, CUDA graph capture and replay, batch splitting, and the
torch zero-copy path with its stream ordering. The fake engine (tests/support/gpu_fake_trt.py) copies part of each
input row, so every result is exact. TensorRT itself is covered by test_trt_gpu.py (-m tensorrt).
Run: pytest -m gpu tests/runtime/test_cuda_runtime_gpu.py
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from tests.support import gpu_fake_trt as fake
import numpy as np
import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu() -> object:
    from clipdeploy.errors import DependencyError
    from clipdeploy.runtime import cuda

    try:
        if cuda.device_count() == 0:
            pytest.skip("no CUDA GPU visible to cuda-python")
        return cuda.gpu_info(0)
    except DependencyError as e:
        pytest.skip(str(e))


@pytest.fixture
def runner_factory(gpu, monkeypatch, tmp_path):
    from clipdeploy.runtime.backends.tensorrt import TrtOptions, TrtRunner

    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    plan = fake.write_plan(tmp_path / "engines" / "image.fp32.plan")
    made = []

    def make(**options: object) -> TrtRunner:
        runner = TrtRunner(plan, TrtOptions(**options), axis_names={"pixel_values": ["batch", 3, 8, 8]})
        made.append(runner)
        return runner

    yield make
    for runner in made:
        runner.close()


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *fake.ROW)).astype(np.float32)


def test_gpu_identity(gpu):
    assert gpu.name and gpu.compute_capability >= (3, 0) and gpu.total_memory > 0
    assert gpu.sm == f"sm{gpu.compute_capability[0]}{gpu.compute_capability[1]}"


def test_host_path_every_batch_size(runner_factory):
    runner = runner_factory()
    assert runner.max_batch == 16 and runner.inputs[0].shape == ("batch", 3, 8, 8)
    for n in (1, 2, 7, 16):
        x = _pixels(n, n)
        out = runner.infer({"pixel_values": x})["image_embeds"]
        np.testing.assert_array_equal(out, fake.expected(x))


def test_session_splits_batches_over_the_profile_max(runner_factory, tmp_path):
    from clipdeploy.artifact.manifest import Variant
    from clipdeploy.artifact.view import ArtifactView
    from clipdeploy.runtime.session import ClipSession

    runner = runner_factory()
    manifest = {
        "model": {"name": "fake", "embed_dim": fake.EMBED, "logit_scale": 1.0, "logit_bias": None},
        "towers": {"image": {}},
        "preprocess": {
            "size": [8, 8],
            "mean": [0, 0, 0],
            "std": [1, 1, 1],
            "interpolation": "bicubic",
            "resize_mode": "squash",
            "fill_color": 0,
        },
        "tokenizer": {},
        "variants": [],
    }
    variant = Variant("image", "fp32", "tensorrt", "engines/image.fp32.plan", "0")
    session = ClipSession(ArtifactView.of(tmp_path, manifest), {"image": runner}, {"image": variant}, "tensorrt")
    x = _pixels(37)
    np.testing.assert_array_equal(session.encode_pixels(x, normalize=False), fake.expected(x))
    np.testing.assert_array_equal(session.encode_pixels(x, normalize=False, batch_size=5), fake.expected(x))

    torch = pytest.importorskip("torch")
    t = torch.from_numpy(x).cuda()
    out = session.encode_pixels(t, normalize=False, return_torch=True)
    assert out.is_cuda and out.dtype == torch.float32
    np.testing.assert_array_equal(out.cpu().numpy(), fake.expected(x))
    normalized = session.encode_pixels(t, return_torch=True)
    np.testing.assert_allclose(normalized.norm(dim=1).cpu().numpy(), 1, rtol=1e-5)


def test_threads_get_their_own_streams_and_buffers(runner_factory):
    runner = runner_factory()
    errors: list[str] = []

    def work(k: int) -> None:
        try:
            for i in range(30):
                n = 1 + (k * 7 + i) % 16
                x = _pixels(n, k * 100 + i)
                out = runner.infer({"pixel_values": x})["image_embeds"]
                if not np.array_equal(out, fake.expected(x)):
                    errors.append(f"thread {k} call {i} (batch {n}) differs")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"thread {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    handles = {state.stream.handle for state in runner._states.values()}
    assert len(handles) == len(runner._states) >= 1


def test_cuda_graphs_are_captured_per_bucket_and_replayed(runner_factory):
    runner = runner_factory(cuda_graphs=True)
    for n in (1, 3, 5, 16, 3, 5, 1, 9, 9):
        x = _pixels(n, n + 17)
        np.testing.assert_array_equal(runner.infer({"pixel_values": x})["image_embeds"], fake.expected(x))
    graphs = runner._local.state.graphs
    buckets = sorted(dict(key)["pixel_values"][0] for key in graphs)
    assert buckets == [1, 4, 8, 16]
    assert all(g is not None for g in graphs.values()), "a capture failed on the GPU"


def test_torch_zero_copy_waits_for_the_callers_stream(runner_factory):
    torch = pytest.importorskip("torch")
    runner = runner_factory()
    side = torch.cuda.Stream()
    a = torch.randn(4096, 4096, device="cuda")
    results = []
    with torch.cuda.stream(side):
        for i in range(4):
            # A slow product queued just before the call: reading x early would read stale memory.
            x = (a @ a).flatten()[: 16 * 192].reshape(16, *fake.ROW) * 0 + i
            results.append((i, runner.run_torch(x)))
    torch.cuda.synchronize()
    for i, out in results:
        assert out.is_cuda and out.shape == (16, fake.EMBED)
        assert torch.all(out == i), f"call {i} read its input before the caller's stream had written it"


def test_close_frees_every_thread_state(runner_factory):
    runner = runner_factory()
    threads = [threading.Thread(target=runner.infer, args=({"pixel_values": _pixels(2)},)) for _ in range(3)]
    for t in threads:
        t.start()
        t.join()
    runner.infer({"pixel_values": _pixels(2)})
    assert 1 <= len(runner._states) <= 2  # states of ended threads are freed as new ones start
    runner.close()
    assert runner._states == {}


def test_plan_file_is_read_once_per_runner(runner_factory, tmp_path):
    runner = runner_factory()
    Path(runner.path).unlink()  # the engine lives in memory from now on
    x = _pixels(3)
    np.testing.assert_array_equal(runner.infer({"pixel_values": x})["image_embeds"], fake.expected(x))
