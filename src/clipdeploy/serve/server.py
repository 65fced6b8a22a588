"""Run the app on uvicorn in this process: SIGTERM marks the server draining (/ready says 503), stops
accepting, lets in-flight requests finish within ``graceful_timeout``, then exits 0."""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

from clipdeploy.deps import require
from clipdeploy.errors import UsageError
from clipdeploy.serve.app import create_app
from clipdeploy.serve.config import ServeConfig

log = logging.getLogger("clipdeploy.serve")


def run_server(cfg: ServeConfig, sessions: dict[str, Any] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a graceful stop."""
    uvicorn = require("uvicorn", "serve")

    app = create_app(cfg, sessions)
    config = uvicorn.Config(
        app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
        timeout_graceful_shutdown=cfg.graceful_timeout, lifespan="on",
    )  # fmt: skip
    server = _draining_server(uvicorn, app)(config)
    print(f"clipdeploy serve: listening on http://{cfg.host}:{cfg.port} (models: "
          f"{', '.join(name for name, _ in cfg.models)}); /ready says when they are warm", file=sys.stderr)
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits 1 when it cannot bind
        if e.code not in (0, None):
            raise UsageError(f"cannot serve on {cfg.host}:{cfg.port} (see the line above); "
                             "pick another --port or --host") from None  # fmt: skip
    if not server.started:
        raise UsageError(f"cannot serve on {cfg.host}:{cfg.port}; pick another --port or --host")
    return 0


def _draining_server(uvicorn: Any, app: Any) -> Any:
    """uvicorn.Server that marks the app draining the moment a stop signal arrives."""

    class DrainingServer(uvicorn.Server):  # type: ignore[misc, name-defined]
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.clipdeploy.draining = True
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                # uvicorn raises a captured signal again after its graceful stop, which would end the
                # process by SIGTERM; a drained stop is a clean exit, 0, for process managers.
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list) and sig in captured:
                    captured.remove(sig)

    return DrainingServer
