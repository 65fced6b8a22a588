"""`clipdeploy serve`: an embedding server (FastAPI) with dynamic batching, on uvicorn or Ray Serve.

``create_app(cfg)`` builds the app; ``serve(cfg)`` runs it here; ``deploy_ray(cfg)`` runs it as Ray
Serve replicas. Nothing here is imported by ``import clipdeploy``.
"""

from clipdeploy.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def create_app(*args, **kwargs):  # type: ignore[no-untyped-def]
    """See :func:`clipdeploy.serve.app.create_app`."""
    # here, not at the top: the app needs fastapi and pydantic, which `import clipdeploy.serve` does not
    from clipdeploy.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)
