"""`clipdeploy serve --ray`: the same app as Ray Serve replicas.

Each replica builds its own app with ``create_app(cfg)`` (``serve.ingress`` given a builder function,
run in the replica) and loads its own sessions there; its startup returns only once every model is warm,
so Ray Serve routes to a replica only when it can answer. Ray Serve does the routing, the health checks
and the restarts: there is no load balancer or process manager here.

``build_ray_app(cfg)`` is the Serve application (for ``serve.run`` or composing); ``deploy_ray(cfg)``
connects, deploys, waits for ``/ready``, then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from clipdeploy.deps import require
from clipdeploy.errors import ServeError, UsageError
from clipdeploy.artifact.view import ArtifactView
from clipdeploy.serve.config import ServeConfig

APP_NAME = "clipdeploy"  # the Serve application's name (serve.status, serve.delete)
DEPLOYMENT_NAME = "clipdeploy"  # its one deployment; replica actors are named SERVE_REPLICA::clipdeploy#clipdeploy#...
# Ray Serve's default is 10 s; the check is a flag read, so a dead replica is noticed sooner for nothing.
HEALTH_CHECK_PERIOD_S = 2.0
READY_TIMEOUT_S = 60.0  # after Serve reports the replicas running, how long the proxy may take to answer /ready
# Ray Serve 2.47 is the first whose serve.ingress takes a builder function (run in each replica).
RAY_FLOOR = "2.47"
_WILDCARDS = ("0.0.0.0", "::", "")


class Replica:
    """One replica. ``serve.ingress`` adds the ASGI app, built in the replica by ``create_app(cfg)``."""

    app: Any  # set by Ray Serve's ASGI wrapper

    def check_health(self) -> None:
        """Ray Serve's periodic check: a replica whose model failed is restarted."""
        try:
            failed = self.app.state.clipdeploy.failed
        except AttributeError:  # the app is not built yet: the replica is still starting
            return
        if failed is not None:
            raise RuntimeError(failed)


def replica_config(cfg: ServeConfig) -> ServeConfig:
    """The config each replica gets: artifact paths absolute, the API key resolved here.

    ``api_key`` "" means "resolved: none", so a replica never reads a key file or ``$CLIPDEPLOY_API_KEY``
    of its own node: every replica applies exactly what this process resolved.
    """
    key = cfg.api_key if cfg.api_key is not None else cfg.resolve_api_key()
    return dataclasses.replace(
        cfg, models=[(name, Path(path).resolve()) for name, path in cfg.models], api_key=key or "", api_key_file=None
    )


def has_engines(cfg: ServeConfig) -> bool:
    """Whether any served artifact carries TensorRT engines."""

    return any(ArtifactView.read(path).variants_of(format="tensorrt") for _, path in cfg.models)


def replica_resources(cfg: ServeConfig, cluster_gpus: float, engines: bool) -> dict[str, float]:
    """``ray_actor_options`` of one replica.

    A GPU (``num_gpus=1``) for ``--backend tensorrt``, and for ``auto`` when the Ray cluster has GPUs
    and an artifact has TensorRT engines (auto then picks TensorRT in the replica, as on one machine).
    Otherwise the replica runs on CPUs and reserves ``--threads`` of them (1 when not given).
    """
    gpu = cfg.backend == "tensorrt" or (cfg.backend == "auto" and cluster_gpus >= 1 and engines)
    if gpu:
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_gpus": 0, "num_cpus": cfg.threads or 1}


def _asgi_builder(cfg: ServeConfig) -> Callable[[], Any]:
    # A plain function (serve.ingress runs functions in the replica, and pickles anything else as an app).
    def build_asgi_app() -> Any:
        # here, not at the top: the replica imports the app (fastapi) when Ray Serve builds it there
        from clipdeploy.serve.app import create_app, load_session

        # Loaded here, in the replica's constructor: an error reaches Ray Serve's status (and our one line);
        # the app's startup then warms every model before the replica takes traffic.
        sessions = {name: load_session(cfg, name, path) for name, path in cfg.models}
        return create_app(cfg, sessions, wait_ready=True)

    return build_asgi_app


def build_ray_app(cfg: ServeConfig, **deployment_options: Any) -> Any:
    """The Ray Serve application serving ``cfg``: ``serve.run(build_ray_app(cfg))``.

    ``cfg.replicas`` replicas, each with its own sessions; GPUs as :func:`replica_resources` says (the
    cluster's GPUs are counted when Ray is already connected, else none). ``deployment_options``
    override the deployment's (``health_check_period_s``, ``ray_actor_options``, ...).
    """
    serve = _require_serve()
    cfg = replica_config(cfg)
    options = {**_deployment_options(cfg), **deployment_options}
    deployment = serve.deployment(serve.ingress(_asgi_builder(cfg))(Replica), **options)
    return deployment.bind()


def _deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    ray = require("ray", "ray")
    gpus = float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
    return {
        "name": DEPLOYMENT_NAME,
        "num_replicas": cfg.replicas,
        "ray_actor_options": replica_resources(cfg, gpus, cfg.backend == "auto" and gpus >= 1 and has_engines(cfg)),
        # Admission is the app's own (--max-queue, 503 past it); Ray's default of 5 would cap batching.
        "max_ongoing_requests": cfg.max_queue,
        "graceful_shutdown_timeout_s": cfg.graceful_timeout,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        # As the single-process server logs: warnings and errors, no line per request.
        "logging_config": {"log_level": "WARNING", "enable_access_log": False},
    }


def deploy_ray(cfg: ServeConfig) -> int:
    """Connect to Ray (``cfg.ray``: "local" starts one), deploy, wait for /ready, serve until SIGTERM/SIGINT; 0."""
    ray = require("ray", "ray")
    serve = _require_serve()
    if cfg.ray == "local":
        _check_port_free(cfg.host, cfg.port)
    started = _connect(ray, cfg.ray or "local")
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # our own line says where it serves
    stop = _StopSignals()
    try:
        resources = _deployment_options(cfg)["ray_actor_options"]
        if started:
            _check_fits(ray, cfg, resources)
        serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config={"log_level": "WARNING"})
        try:
            serve.run(build_ray_app(cfg), name=APP_NAME, route_prefix="/")
        except RuntimeError as e:
            raise ServeError(f"Ray Serve could not start the replicas ({_why_failed(serve) or _first_line(e)}); "
                             "the replica logs above say more") from None  # fmt: skip
        url = _proxy_url(ray, cfg, started)
        _wait_ready(url, READY_TIMEOUT_S)
        print(f"clipdeploy serve: serving on Ray Serve at {url} ({cfg.replicas} replica(s), "
              f"{resources['num_gpus']:g} GPU and {resources['num_cpus']:g} CPU each; models: "
              f"{', '.join(n for n, _ in cfg.models)}; Ray at {ray.get_runtime_context().gcs_address})",
              file=sys.stderr, flush=True)  # fmt: skip
        stop.wait()
    except _Stop:
        pass  # stopped while deploying: shut down as after serving
    finally:
        stop.restore()
        _shut_down(ray, serve, started)
    return 0


# ---- the pieces ----------------------------------------------------------------------------------


def _require_serve() -> Any:
    serve = require("ray.serve", "ray")
    from packaging.version import Version

    import ray

    if Version(ray.__version__) < Version(RAY_FLOOR):
        raise UsageError(f"clipdeploy serve --ray needs Ray Serve {RAY_FLOOR} or newer, found {ray.__version__}; "
                         f"pip install 'ray[serve]>={RAY_FLOOR}'")  # fmt: skip
    return serve


def _connect(ray: Any, address: str) -> bool:
    """Connect; True when this call started a local Ray (which this process then shuts down)."""
    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
        return True
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UsageError(f"--ray {address}: cannot connect to a Ray cluster ({_first_line(e)}); start one with "
                         "`ray start --head`, pass its address, or pass --ray alone for a local Ray") from None  # fmt: skip
    return False


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UsageError(f"cannot serve on {host}:{port} ({e.strerror}); pick another --port or --host") from None


def _check_fits(ray: Any, cfg: ServeConfig, need: dict[str, float]) -> None:
    """On a local Ray (no autoscaler), replicas that cannot all be placed would wait forever: say so now."""
    have = ray.cluster_resources()
    for key, label in (("num_gpus", "GPU"), ("num_cpus", "CPU")):
        per = need.get(key, 0)
        if per * cfg.replicas > have.get(label, 0):
            fit = max(int(have.get(label, 0) // per), 1)
            hint = " or a smaller --threads" if label == "CPU" and cfg.threads else ""
            raise UsageError(f"--replicas {cfg.replicas} needs {per * cfg.replicas:g} {label}(s) ({per:g} each), and "
                             f"this machine's Ray has {have.get(label, 0):g}; pass --replicas {fit}{hint}, or join a "
                             "larger cluster with --ray ADDRESS")  # fmt: skip


def _proxy_url(ray: Any, cfg: ServeConfig, local: bool) -> str:
    host = cfg.host
    if host in _WILDCARDS:
        host = "127.0.0.1" if local else _head_ip(ray)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.port}"


def _head_ip(ray: Any) -> str:
    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return str(node["NodeManagerAddress"])
    return "127.0.0.1"


def _wait_ready(url: str, timeout: float) -> None:
    """Poll ``url``/ready until it answers 200; one line if it does not in time."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=5) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        time.sleep(0.25)
    raise ServeError(f"Ray Serve's proxy did not answer 200 on {url}/ready within {timeout:g} s (last: {last}); on a "
                     "remote cluster pass --host 0.0.0.0 (the proxy binds on the cluster's nodes), and check that "
                     "no other Serve instance on it already uses another port")  # fmt: skip


def _shut_down(ray: Any, serve: Any, started: bool) -> None:
    """A local Ray we started goes entirely; on a shared cluster only our application is deleted."""
    if not ray.is_initialized():
        return
    try:
        if started:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()


def _why_failed(serve: Any) -> str | None:
    """The replicas' own error, from the deployment's status message (Ray's exception says only "failed")."""
    try:
        message = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME].message
    except Exception:  # the status itself is unavailable: the caller falls back to Ray's exception
        return None
    ours = [line.strip().partition(": ")[2] for line in message.splitlines()
            if line.strip().startswith("clipdeploy.errors.")]  # fmt: skip
    return ours[-1] if ours else None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


class _Stop(Exception):
    """SIGTERM or SIGINT arrived."""


class _StopSignals:
    """SIGTERM/SIGINT end serving (also while deploying); installed after ray.init, which sets its own."""

    def __init__(self) -> None:
        self._old: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._raise)

    @staticmethod
    def _raise(signum: int, frame: FrameType | None) -> None:
        raise _Stop(signal.Signals(signum).name)

    def wait(self) -> None:
        while True:
            time.sleep(3600)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
