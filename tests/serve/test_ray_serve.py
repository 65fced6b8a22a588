"""`clipdeploy serve --ray` on a local Ray: two replicas answer as one process does, and a killed replica
is replaced while the service stays up. The CLI runs as users run it (a subprocess, SIGTERM to stop);
a second process (ray_kill_replica.py, a driver of the server's Ray) kills a replica and reads Serve's status."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ray", reason="Ray Serve tests need ray[serve] (pip install 'clipdeploy[ray]')")
pytest.importorskip("ray.serve", reason="Ray Serve tests need ray[serve] (pip install 'clipdeploy[ray]')")
pytest.importorskip("fastapi", reason="clipdeploy serve needs the 'serve' extra (fastapi)")
pytest.importorskip("prometheus_client", reason="clipdeploy serve needs the 'serve' extra (prometheus-client)")
httpx = pytest.importorskip("httpx", reason="the serve tests drive the server with httpx")

KEY = "ray-test-key"
TEXTS = ["a photo of a cat", "a diagram of a bridge", "x", "two dogs playing in the snow at dusk"]
START_TIMEOUT_S = 150.0  # a cold local Ray, two replicas each loading the model, on a loaded 2-core machine
RECOVERY_TIMEOUT_S = 90.0
MIN_COSINE = 0.99999


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _png(seed: int, size: tuple[int, int]) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)  # smooth fields: seeds embed differently
    buf = io.BytesIO()
    Image.fromarray(base).resize(size, Image.Resampling.BILINEAR).save(buf, "PNG")
    return buf.getvalue()


IMAGES = [_png(0, (64, 64)), _png(1, (97, 53)), _png(2, (30, 120))]


class Served:
    """The CLI process, its URL and its Ray address; stderr goes to a file (read for the ready line)."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log
        self.url = ""
        self.ray_address = ""

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"serving on Ray Serve at (\S+) .*; Ray at (\S+)\)", self.stderr())
            if m:
                self.url, self.ray_address = m.group(1), m.group(2)
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited {self.proc.returncode} before serving:\n{self.stderr()[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"the server did not report serving within {timeout:g} s:\n{self.stderr()[-4000:]}")


@pytest.fixture
def served(micro_artifact: Any, tmp_path: Path) -> Iterator[Served]:
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    log = tmp_path / "serve.stderr"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("CLIPDEPLOY_API_KEY", None)
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "clipdeploy.cli", "serve", f"micro={micro_artifact.path}", "--ray",
             "--replicas", "2", "--host", "127.0.0.1", "--port", str(_free_port()), "--threads", "1",
             "--decode-workers", "1", "--max-wait-ms", "1", "--api-key-file", str(key_file)],
            stdout=subprocess.DEVNULL, stderr=err, env=env,
        )  # fmt: skip
    s = Served(proc, log)
    try:
        yield s
    finally:
        if proc.poll() is None:  # the test failed before stopping it: stop it (it shuts its Ray down)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def _embed(client: Any, inputs: list[Any]) -> np.ndarray:
    r = client.post("/v1/embeddings", json={"model": "micro", "input": inputs, "encoding_format": "base64"})
    assert r.status_code == 200, f"HTTP {r.status_code}: {r.text[:500]}"
    data = sorted(r.json()["data"], key=lambda d: d["index"])
    return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])


def _check_answers(client: Any, want_text: np.ndarray, want_image: np.ndarray, rounds: int) -> None:
    """``rounds`` requests of each kind (spread over the replicas by Ray Serve's router), all equal to the local rows."""
    for _ in range(rounds):
        for got, want, what in ((_embed(client, TEXTS), want_text, "texts"),
                                (_embed(client, [{"image": base64.b64encode(b).decode()} for b in IMAGES]),
                                 want_image, "images")):  # fmt: skip
            assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
            cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
            assert cos.min() >= MIN_COSINE, f"{what}: cosine min {cos.min():.7f} < {MIN_COSINE} ({np.round(cos, 7)})"


def test_two_replicas_answer_as_one_process_and_a_killed_one_is_replaced(served: Served, micro_artifact: Any) -> None:
    import clipdeploy

    t0 = time.monotonic()
    session = clipdeploy.load(micro_artifact.path)
    want_text, want_image = session.encode_text(TEXTS), session.encode_image(IMAGES)
    served.wait_serving(START_TIMEOUT_S)
    started_s = time.monotonic() - t0
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=served.url, headers=headers, timeout=30) as client:
        assert client.get("/ready").status_code == 200
        for _ in range(4):  # the key is checked in every replica
            r = httpx.post(f"{served.url}/v1/embeddings", json={"model": "micro", "input": "a cat"}, timeout=30)
            assert r.status_code == 401, r.text
        _check_answers(client, want_text, want_image, rounds=4)

        killer = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("ray_kill_replica.py")), served.ray_address,
             str(RECOVERY_TIMEOUT_S)],
            capture_output=True, text=True, timeout=RECOVERY_TIMEOUT_S + 60, check=False,
            env={**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")},
        )  # fmt: skip
        assert killer.returncode == 0, killer.stderr[-4000:]
        seen = json.loads(killer.stdout.strip().splitlines()[-1])
        assert len(seen["before"]) == 2 and seen["running_before"] == 2, seen
        assert "recovered_s" in seen, f"Ray Serve did not run 2 replicas again within {RECOVERY_TIMEOUT_S:g} s: {seen}"
        assert seen["victim"] not in seen["after"] and len(seen["after"]) == 2, seen
        recovered_s = seen["recovered_s"]
        assert client.get("/ready").status_code == 200
        _check_answers(client, want_text, want_image, rounds=4)

    served.proc.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    assert served.proc.wait(timeout=60) == 0, served.stderr()[-4000:]
    stopped_s = time.monotonic() - stopped
    assert "Traceback" not in served.stderr(), served.stderr()[-4000:]
    print(f"ray serve: serving {started_s:.1f} s after start, recovered {recovered_s:.1f} s after the kill, "
          f"stopped {stopped_s:.1f} s after SIGTERM")
