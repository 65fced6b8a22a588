"""Lazy imports of the heavy optional libraries, with a one-line error naming the extra to install.

``import clipdeploy`` and the runtime import none of torch, open_clip, onnx, onnxruntime or TensorRT;
each is imported where it is needed, through :func:`require`, so a missing one is reported as
"clipdeploy quantize needs onnx, which is not installed; install: pip install 'clipdeploy[export]'"
instead of a ``ModuleNotFoundError`` traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from clipdeploy.errors import DependencyError

# The command being run ("clipdeploy quantize"), set by the CLI, so the message can name it.
command: str | None = None

# The pip names of the modules, where they differ from the import name.
_PIP_NAMES = {
    "open_clip": "open_clip_torch",
    "onnx_ir": "onnx-ir",
    "cuda": "cuda-python",
    "skimage": "scikit-image",
    "onnxruntime": "onnxruntime (or onnxruntime-gpu)",
}
# The extra that installs each optional library: a library that is missing underneath another one
# (onnxruntime's fp16 converter needs onnx) is reported with its own extra.
_EXTRAS = {
    "onnx": "export", "onnx_ir": "export", "onnxscript": "export", "torch": "export", "torchvision": "export", "open_clip": "export",
    "transformers": "export", "timm": "export", "safetensors": "export", "onnxruntime": "cpu",
    "tensorrt": "tensorrt", "cuda": "tensorrt", "matplotlib": "bench", "tqdm": "bench", "tritonclient": "triton",
    "pyarrow": "bulk", "ray": "ray", "polygraphy": "tensorrt",
}
_EXTRA_HINTS = {"cpu": "'clipdeploy[cpu]' (or 'clipdeploy[gpu]' for CUDA)"}


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` (a dotted path is fine), or raise a DependencyError naming ``extra``."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        missing = e.name or top
        if missing.split(".")[0] != top and missing.split(".")[0] in _EXTRAS:
            top, extra = missing.split(".")[0], _EXTRAS[missing.split(".")[0]]
            missing = top
        if missing == top:
            what = f"{_PIP_NAMES.get(top, top)}, which is not installed"
        elif missing.startswith(top + "."):  # the package is there but lacks a module: too old
            what = f"{missing}, which the installed {_PIP_NAMES.get(top, top)} lacks (upgrade it)"
        else:  # the package is there but one of its own dependencies is not
            what = f"{_PIP_NAMES.get(top, top)}, whose dependency {missing} is not installed"
        who = command or "clipdeploy"
        hint = _EXTRA_HINTS.get(extra, f"'clipdeploy[{extra}]'")
        raise DependencyError(f"{who} needs {what}; install: pip install {hint}") from e
