"""`clipdeploy run`: a YAML file of models, built, validated and benchmarked incrementally.

``load_config(file)`` checks and resolves the file into the stages' own config dataclasses;
``run_pipeline(config)`` runs every model's stages and returns the summary. Nothing heavy is
imported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipdeploy.pipeline.config import PipelineConfig
    from clipdeploy.pipeline.runner import RunOptions

__all__ = ["load_config", "run_pipeline"]


def load_config(file: Any, output: Any = None) -> PipelineConfig:
    """Read and check a pipeline YAML file; see :func:`clipdeploy.pipeline.config.load_config`."""
    # here, not at the top: importing the package must not load its heavier modules
    from clipdeploy.pipeline.config import load_config as _load

    return _load(file, output)


def run_pipeline(config: PipelineConfig, options: RunOptions | None = None) -> dict[str, Any]:
    """Run every model of ``config``; see :func:`clipdeploy.pipeline.runner.run_pipeline`."""
    # here, not at the top: importing the package must not load its heavier modules
    from clipdeploy.pipeline.runner import run_pipeline as _run

    return _run(config, options)
