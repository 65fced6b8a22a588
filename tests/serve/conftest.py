"""Serve fixtures: two micro ViT artifacts with different weights, their sessions, and an app to drive.

The app runs in-process through httpx's ASGI transport (its lifespan entered by hand, as uvicorn would),
or under a real uvicorn in a thread where a real client (the openai package) needs a socket.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="clipdeploy serve needs the 'serve' extra (fastapi)")
pytest.importorskip("uvicorn", reason="clipdeploy serve needs the 'serve' extra (uvicorn)")
pytest.importorskip("prometheus_client", reason="clipdeploy serve needs the 'serve' extra (prometheus-client)")
httpx = pytest.importorskip("httpx", reason="the serve tests drive the app with httpx")

from tests.conftest import _export_from_checkpoint  # noqa: E402
from tests.support.models import MODELS  # noqa: E402


@pytest.fixture(scope="session")
def second_micro_artifact(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The micro ViT with other seeded weights: a row crossing between the two models would show."""
    pytest.importorskip("open_clip")
    m = MODELS["micro-vit"]
    return _export_from_checkpoint(tmp_path_factory.mktemp("micro-b"), m.name, m.seed + 101, m.config_path)


@pytest.fixture(scope="module")
def sessions(micro_artifact: Any, second_micro_artifact: Any) -> dict[str, Any]:
    import clipdeploy

    return {"a": clipdeploy.load(micro_artifact.path), "b": clipdeploy.load(second_micro_artifact.path)}


def config(sessions: dict[str, Any], **overrides: Any) -> Any:
    from clipdeploy.serve.config import ServeConfig

    return ServeConfig(models=[(name, s.root) for name, s in sessions.items()], **overrides)


@contextlib.asynccontextmanager
async def client_for(app: Any, *, wait_ready: bool = True, headers: dict[str, str] | None = None
                     ) -> AsyncIterator[Any]:  # fmt: skip
    """An httpx client on the app, with its lifespan running (startup before, shutdown after)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve.test", headers=headers,
                                     timeout=60) as client:  # fmt: skip
            if wait_ready:
                await until_ready(client)
            yield client


async def until_ready(client: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await client.get("/ready")).status_code == 200:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"/ready did not answer 200 within {timeout:g} s")


@contextlib.contextmanager
def uvicorn_thread(app: Any) -> Iterator[str]:
    """A real uvicorn server on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def png(size: tuple[int, int], seed: int = 0, mode: str = "RGB") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "PNG")
    return buf.getvalue()


def jpeg(size: tuple[int, int], seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    # smooth colour fields, so JPEG keeps them and different seeds embed differently
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def rows(response: Any) -> np.ndarray:
    """The embeddings of an OpenAI-shaped response, float or base64, in index order."""
    data = sorted(response.json()["data"], key=lambda d: d["index"])
    out = []
    for d in data:
        e = d["embedding"]
        out.append(np.frombuffer(base64.b64decode(e), dtype="<f4") if isinstance(e, str) else np.asarray(e, np.float32))
    return np.stack(out)


def assert_rows_equal(got: np.ndarray, want: np.ndarray, what: str, min_cos: float = 0.99999) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= min_cos, f"{what}: cosine min {cos.min():.7f} < {min_cos} (per row {np.round(cos, 7)})"


class SlowSession:
    """A real session whose inference takes ``delay`` seconds longer: a stand-in for a loaded server."""

    def __init__(self, session: Any, delay: float) -> None:
        self._session = session
        self.delay = delay
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def encode_pixels(self, x: Any, **kw: Any) -> Any:
        self.calls += 1
        time.sleep(self.delay)
        return self._session.encode_pixels(x, **kw)

    def encode_tokens(self, x: Any, **kw: Any) -> Any:
        self.calls += 1
        time.sleep(self.delay)
        return self._session.encode_tokens(x, **kw)


@pytest.fixture
def artifact_paths(sessions: dict[str, Any]) -> dict[str, Path]:
    return {name: s.root for name, s in sessions.items()}
