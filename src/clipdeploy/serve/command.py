"""`clipdeploy serve`: load the artifacts (failing fast, in one line), then serve them here or on Ray Serve."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from clipdeploy.deps import require
from clipdeploy.options import add_dataclass_options, config_from_args
from clipdeploy.serve.config import API_KEY_ENV, ServeConfig, parse_model_args

DESCRIPTION = f"""\
Serve embeddings over HTTP: POST /v1/embeddings (OpenAI-compatible; texts, and images as
{{"image": "<base64 or data: URL>"}} items), POST /v1/classify (zero-shot), GET /v1/models, /health,
/ready, /metrics. Requests are batched dynamically per model and tower (--max-batch, --max-wait-ms);
a full queue answers 503 with Retry-After. No URL is ever fetched for a client.

Here:  clipdeploy serve artifacts/vit-b-32 --port 8080
       one process; binds 127.0.0.1 unless --host says otherwise; SIGTERM drains, then exits 0.
Ray:   clipdeploy serve vit=artifacts/vit-b-32 --ray --replicas 2
       the same app as Ray Serve replicas (--ray alone starts a local Ray; --ray auto or --ray ADDRESS
       joins a cluster), each holding its own sessions, one GPU each on TensorRT; Ray Serve routes and
       restarts them. pip install 'clipdeploy[serve,ray]'.
API key: --api-key-file FILE or ${API_KEY_ENV}; clients send 'Authorization: Bearer KEY'.
pip install 'clipdeploy[cpu,serve]' is all a CPU server needs (no PyTorch)."""


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = config_from_args(ServeConfig, args, models=parse_model_args(args.artifacts), ray=args.ray)
    return run_serve(cfg)


def run_serve(cfg: ServeConfig) -> int:
    """Check, load every model (one line on failure), then serve until stopped; the exit code."""
    cfg.check()
    require("fastapi", "serve")
    require("uvicorn", "serve")
    require("prometheus_client", "serve")
    cfg.api_key = cfg.resolve_api_key()
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and cfg.api_key is None:
        print(f"clipdeploy serve: warning: serving on {cfg.host} without an API key (--api-key-file or "
              f"${API_KEY_ENV})", file=sys.stderr)  # fmt: skip
    if cfg.ray is not None:
        # here, not at the top: ray loads only with --ray
        from clipdeploy.serve.ray_deploy import deploy_ray

        return deploy_ray(cfg)
    # here, not at the top: every `clipdeploy` command imports this module, and the server needs fastapi
    from clipdeploy.serve.app import load_session
    # here, not at the top: as above (uvicorn)
    from clipdeploy.serve.server import run_server

    sessions: dict[str, Any] = {}
    for name, path in cfg.models:
        sessions[name] = load_session(cfg, name, path)
        print(f"clipdeploy serve: {name}: {sessions[name].describe()}", file=sys.stderr)
    return run_server(cfg, sessions)


def add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve embeddings over HTTP (OpenAI-compatible), with dynamic batching; here or on Ray Serve",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION,
    )
    p.add_argument("artifacts", nargs="+", metavar="[NAME=]ARTIFACT",
                   help="artifact directories; each is served under its directory name, or NAME")  # fmt: skip
    p.add_argument(
        "--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
        help="run as Ray Serve replicas: no value starts a local Ray, 'auto' or an address joins a cluster",
    )  # fmt: skip
    add_dataclass_options(
        p, ServeConfig,
        ["host", "port", "backend", "precision", "threads", "max_batch", "max_wait_ms", "max_queue", "max_items",
         "max_body_mb", "max_inflight_mb", "max_image_pixels", "decode_workers", "api_key_file", "open_metrics", "graceful_timeout",
         "label_cache", "replicas"],
    )  # fmt: skip
    p.set_defaults(func=cmd_serve)
