"""The Ray Serve glue without a Ray cluster: what each replica is given, and what it reserves."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="clipdeploy serve needs the 'serve' extra (fastapi)")
pytest.importorskip("prometheus_client", reason="clipdeploy serve needs the 'serve' extra (prometheus-client)")
httpx = pytest.importorskip("httpx", reason="the serve tests drive the app with httpx")

from clipdeploy.serve.app import create_app  # noqa: E402
from clipdeploy.serve.config import API_KEY_ENV, ServeConfig  # noqa: E402
from clipdeploy.serve.ray_deploy import replica_config, replica_resources  # noqa: E402


class FakeSession:
    """Just what ServedModel's warm-up touches."""

    embed_dim = 4
    tokenizer = None

    def preprocess(self, image: Any) -> np.ndarray:
        return np.zeros((1, 3, 8, 8), np.float32)

    def tokenize(self, texts: list[str]) -> np.ndarray:
        return np.ones((len(texts), 5), np.int64)

    def encode_pixels(self, x: Any) -> np.ndarray:
        return np.ones((len(x), 4), np.float32)

    def encode_tokens(self, x: Any) -> np.ndarray:
        return np.ones((len(x), 4), np.float32)

    def describe(self) -> str:
        return "fake"


async def _status(app: Any, path: str, headers: dict[str, str] | None = None) -> int:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://serve.test") as client:
        return (await client.get(path, headers=headers)).status_code


def test_replicas_apply_the_key_resolved_here_not_their_nodes_own(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    cfg = ServeConfig(models=[("m", Path("relative/art"))])
    plain = replica_config(cfg)
    assert plain.api_key == "" and plain.api_key_file is None
    assert plain.models == [("m", Path("relative/art").resolve())] and plain.models[0][1].is_absolute()
    assert pickle.loads(pickle.dumps(plain)) == plain

    monkeypatch.setenv(API_KEY_ENV, "a-key-of-the-replica-node")  # the replica's node has a key set
    assert asyncio.run(_status(create_app(cfg), "/v1/models")) == 401  # cfg as given would read it there
    assert asyncio.run(_status(create_app(plain), "/v1/models")) == 200  # the resolved config does not

    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    keyed = replica_config(ServeConfig(models=[("m", tmp_path)], api_key_file=key_file))
    key_file.unlink()  # the file need not exist where the replicas run
    keyed = pickle.loads(pickle.dumps(keyed))
    assert keyed.api_key == "s3cret"
    assert asyncio.run(_status(create_app(keyed), "/v1/models")) == 401
    assert asyncio.run(_status(create_app(keyed), "/v1/models", {"Authorization": "Bearer s3cret"})) == 200


@pytest.mark.parametrize(
    ("backend", "threads", "cluster_gpus", "engines", "want"),
    [
        ("tensorrt", None, 4, True, {"num_gpus": 1, "num_cpus": 1}),
        ("auto", None, 1, True, {"num_gpus": 1, "num_cpus": 1}),  # auto picks TensorRT in the replica
        ("auto", None, 0, True, {"num_gpus": 0, "num_cpus": 1}),  # engines, but no GPU in the cluster
        ("auto", 3, 2, False, {"num_gpus": 0, "num_cpus": 3}),  # a GPU cluster, but nothing to run on it
        ("onnxruntime", 2, 8, True, {"num_gpus": 0, "num_cpus": 2}),  # serve runs ONNX Runtime on the CPU
        ("openvino", None, 8, True, {"num_gpus": 0, "num_cpus": 1}),
    ],
)
def test_replica_resources(backend, threads, cluster_gpus, engines, want) -> None:
    cfg = ServeConfig(models=[("m", Path("a"))], backend=backend, threads=threads)
    assert replica_resources(cfg, cluster_gpus, engines) == want


def _slow_load(delay: float, fail: bool = False) -> Any:
    def load(cfg: ServeConfig, name: str, path: Any) -> Any:
        time.sleep(delay)
        if fail:
            raise OSError("the disk went away")
        return FakeSession()

    return load


def test_wait_ready_startup_returns_only_once_every_model_is_warm() -> None:
    cfg = ServeConfig(models=[("m", Path("a")), ("n", Path("b"))])

    async def ready_after_startup(wait_ready: bool) -> bool:
        app = create_app(cfg, loader=_slow_load(0.3), wait_ready=wait_ready)
        async with app.router.lifespan_context(app):
            return app.state.clipdeploy.ready and await _status(app, "/ready") == 200

    assert asyncio.run(ready_after_startup(wait_ready=True))
    assert not asyncio.run(ready_after_startup(wait_ready=False))  # the default: loads in the background


def test_wait_ready_startup_fails_when_a_model_cannot_load() -> None:
    app = create_app(ServeConfig(models=[("m", Path("a"))]), loader=_slow_load(0.0, fail=True), wait_ready=True)

    async def start() -> None:
        async with app.router.lifespan_context(app):
            pass

    with pytest.raises(RuntimeError, match="model 'm' failed to load or warm up: the disk went away"):
        asyncio.run(start())


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    from clipdeploy.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err


def _one_line(code: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_replicas_without_ray_is_a_usage_error(tmp_path, capsys) -> None:
    (tmp_path / "manifest.json").write_text("{}")
    code, err = _cli(capsys, "serve", str(tmp_path), "--replicas", "2")
    _one_line(code, err, "--replicas 2 needs --ray")


def test_ray_refuses_a_port_in_use_before_starting_ray(tmp_path, capsys) -> None:
    pytest.importorskip("ray.serve", reason="clipdeploy serve --ray needs ray[serve] (pip install 'clipdeploy[ray]')")
    import socket

    import ray

    (tmp_path / "manifest.json").write_text("{}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = _cli(capsys, "serve", str(tmp_path), "--ray", "--port", str(port))
    _one_line(code, err, f"cannot serve on 127.0.0.1:{port}", "pick another --port")
    assert not ray.is_initialized()


def test_a_failed_deployment_is_reported_by_the_replicas_own_error() -> None:
    from types import SimpleNamespace

    from clipdeploy.serve.ray_deploy import APP_NAME, DEPLOYMENT_NAME, _why_failed

    # The shape of Ray Serve's status message after replicas failed in their constructor (abridged).
    message = (
        "The deployment failed to start 3 times in a row. This may be due to a problem with its constructor. Error:\n"
        "ray::ServeReplica:clipdeploy:clipdeploy.initialize_and_get_metadata() (pid=1, ip=10.0.0.1)\n"
        "RuntimeError: Traceback (most recent call last):\n"
        '  File "/x/ray/serve/_private/replica.py", line 1, in initialize\n'
        "clipdeploy.errors.ArtifactError: '/a/image.fp32.onnx' has sha256 87ed…, the manifest says 6520…: "
        "the file changed or is corrupt; re-export the model with --force\n"
    )
    deployment = SimpleNamespace(message=message)
    serve = SimpleNamespace(status=lambda: SimpleNamespace(
        applications={APP_NAME: SimpleNamespace(deployments={DEPLOYMENT_NAME: deployment})}))  # fmt: skip
    assert _why_failed(serve) == ("'/a/image.fp32.onnx' has sha256 87ed…, the manifest says 6520…: the file changed "
                                  "or is corrupt; re-export the model with --force")  # fmt: skip
    deployment.message = "The deployment failed to start: RuntimeError: ASGI lifespan startup failed."
    assert _why_failed(serve) is None  # nothing of ours: the caller says what Ray said

    def unavailable() -> Any:
        raise ConnectionError("no controller")

    assert _why_failed(SimpleNamespace(status=unavailable)) is None


def test_a_local_ray_refuses_replicas_it_cannot_place() -> None:
    from types import SimpleNamespace

    from clipdeploy.errors import UsageError
    from clipdeploy.serve.ray_deploy import _check_fits

    ray = SimpleNamespace(cluster_resources=lambda: {"CPU": 4.0})
    cfg = ServeConfig(models=[("m", Path("a"))], ray="local", replicas=3, threads=2)
    with pytest.raises(UsageError, match=r"--replicas 3 needs 6 CPU\(s\) \(2 each\), and this machine's Ray has 4; "
                                         r"pass --replicas 2 or a smaller --threads"):  # fmt: skip
        _check_fits(ray, cfg, replica_resources(cfg, 0, False))
    with pytest.raises(UsageError, match=r"needs 3 GPU\(s\) \(1 each\), and this machine's Ray has 0; pass --replicas 1"):
        _check_fits(ray, cfg, {"num_gpus": 1, "num_cpus": 1})
    _check_fits(ray, dataclasses.replace(cfg, replicas=2), replica_resources(cfg, 0, False))  # 4 of 4 CPUs: fits


def test_a_replica_whose_model_failed_fails_its_health_check() -> None:
    from types import SimpleNamespace

    from clipdeploy.serve.ray_deploy import Replica

    replica = Replica()
    replica.check_health()  # still starting: no app yet
    state = SimpleNamespace(failed=None)
    replica.app = SimpleNamespace(state=SimpleNamespace(clipdeploy=state))
    replica.check_health()
    state.failed = "model 'm' failed to load or warm up: out of memory"
    with pytest.raises(RuntimeError, match="out of memory"):
        replica.check_health()
