"""The server over a real socket: the official openai client, httpx with the documented image shape,
and SIGTERM letting an in-flight request finish before a clean exit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import numpy as np
import pytest

from clipdeploy.serve.app import create_app
from tests.serve.conftest import assert_rows_equal, b64, config, jpeg, rows, uvicorn_thread

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_openai_client_base64_and_float_and_images_over_httpx(sessions: dict[str, Any]) -> None:
    openai = pytest.importorskip("openai", reason="the test drives the server with the official openai client")
    import httpx

    s = sessions["a"]
    texts = ["a photo of a cat", "a blue circle at the top", "x"]
    images = [jpeg((224, 224), 5), jpeg((300, 200), 6)]
    want_text, want_image = s.encode_text(texts), s.encode_image(images)
    with uvicorn_thread(create_app(config(sessions, api_key="k"), sessions)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/ready").status_code != 200:
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.05)
        default = client.embeddings.create(model="a", input=texts)  # the client asks for base64 by default
        floats = client.embeddings.create(model="a", input=texts, encoding_format="float")
        for name, result in (("default (base64)", default), ("float", floats)):
            got = np.array([d.embedding for d in sorted(result.data, key=lambda d: d.index)], dtype=np.float32)
            assert_rows_equal(got, want_text, f"openai client, {name}")
            assert result.usage.prompt_tokens == int((s.tokenize(texts) != 0).sum())
        with pytest.raises(openai.NotFoundError, match="served: a, b"):
            client.embeddings.create(model="missing", input="x")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).embeddings.create(model="a", input="x")
        r = httpx.post(f"{url}/v1/embeddings", headers={"Authorization": "Bearer k"}, timeout=60,
                       json={"model": "a", "input": [{"image": b64(i)} for i in images]})  # fmt: skip
        assert r.status_code == 200, r.text
        assert_rows_equal(rows(r), want_image, "images over httpx")


_SLOW_SERVER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    import clipdeploy
    from clipdeploy.serve.config import ServeConfig
    from clipdeploy.serve.server import run_server
    from tests.serve.conftest import SlowSession

    session = SlowSession(clipdeploy.load({artifact!r}), delay=0.0)
    cfg = ServeConfig(models=[("a", session.root)], port={port}, graceful_timeout=30, max_wait_ms=0)
    import threading
    def slow_after_warm_up():  # requests, not the warm-up, take 3 s each
        time.sleep(0.5)
        session.delay = 3.0
    threading.Thread(target=slow_after_warm_up, daemon=True).start()
    sys.exit(run_server(cfg, {{"a": session}}))
""")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_sigterm_lets_the_in_flight_request_finish_then_exits_0(sessions: dict[str, Any]) -> None:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    script = _SLOW_SERVER.format(repo=REPO, artifact=str(sessions["a"].root), port=port)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"the server exited early: {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "the server never became ready"
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        time.sleep(0.6)  # past the switch to slow inference
        result: dict[str, Any] = {}

        def in_flight() -> None:
            r = httpx.post(f"{url}/v1/embeddings", json={"model": "a", "input": "still answered"}, timeout=60)
            result["status"], result["body"] = r.status_code, r.json()

        t = threading.Thread(target=in_flight)
        t.start()
        time.sleep(1.0)  # the request is now inside its 3-second inference
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=60)
        code = proc.wait(timeout=60)
        _, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert result.get("status") == 200, f"the in-flight request got {result}; server stderr: {err[-2000:]}"
    assert len(result["body"]["data"]) == 1
    assert code == 0, f"exit code {code}; stderr: {err[-2000:]}"
    with pytest.raises(httpx.TransportError):  # and it no longer accepts connections
        httpx.get(f"{url}/health", timeout=2)


def test_cli_refusals_are_one_line_exit_2(sessions: dict[str, Any], tmp_path: Any) -> None:
    root = sessions["a"].root
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    cases = [
        ([str(tmp_path)], "not an artifact directory"),
        ([f"x={root}", f"x={root}"], "two artifacts are served as 'x'"),
        ([str(root), "--max-batch", "0"], "--max-batch 0 must be 1 or more"),
        ([str(root), "--api-key-file", str(tmp_path / "nokey")], "cannot be read"),
        ([str(root), "--port", str(port)], f"cannot serve on 127.0.0.1:{port}"),
    ]
    try:
        for argv, words in cases:
            proc = subprocess.run([sys.executable, "-m", "clipdeploy.cli", "serve", *argv], capture_output=True,
                                  text=True, timeout=120, cwd=REPO)  # fmt: skip
            err_lines = [line for line in proc.stderr.splitlines() if line.startswith("clipdeploy: error")]
            assert proc.returncode == 2, f"{argv}: exit {proc.returncode}; {proc.stderr[-1500:]}"
            assert len(err_lines) == 1 and words in err_lines[0], f"{argv}: {proc.stderr[-1500:]}"
            assert "Traceback" not in proc.stderr, proc.stderr
    finally:
        busy.close()
