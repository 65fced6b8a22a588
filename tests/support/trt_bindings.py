"""The real TensorRT 10.13 and 11.4 Python bindings, importable on a machine without TensorRT or a GPU.

As ``../shared/tools/trt-api`` does: each version's bindings wheel comes from the package registry,
and the three native libraries it links against are replaced by stubs compiled here, the way CUDA
ships stub libraries for linking without a driver. Every class, enum member and docstring is the
real one; anything that would reach the native library (``Builder()``, ``Runtime()``) raises
TypeError. The matching cuda-python runtime bindings (CUDA 12 for TensorRT 10, CUDA 13 for 11) come
along, so one import path has the pair a user installs with ``clipdeploy[tensorrt10]`` or ``[tensorrt]``.

One process can import only one TensorRT, so contract checks run in subprocesses with ``env(site)``.
Cache: $CLIPDEPLOY_TRT_API_CACHE, else ~/.cache/clipdeploy/trt-api.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

VERSIONS = {
    10: ("tensorrt-cu12-bindings==10.13.*", "cuda-bindings==12.9.*"),
    11: ("tensorrt-cu13-bindings==11.4.*", "cuda-bindings==13.*"),
}
# cuda-bindings imports cuda.pathfinder; this range satisfies both the 12.9 and the 13 line.
PATHFINDER = "cuda-pathfinder>=1.4.2,<2"

# The only C entry points the bindings import; every factory returns NULL.
STUB_C = """
#include <stddef.h>
void *createInferBuilder_INTERNAL(void *l, int v) { return NULL; }
void *createInferRefitter_INTERNAL(void *e, void *l, int v) { return NULL; }
void *createInferRuntime_INTERNAL(void *l, int v) { return NULL; }
void *createNvOnnxParserRefitter_INTERNAL(void *r, void *l, int v) { return NULL; }
void *createNvOnnxParser_INTERNAL(void *n, void *l, int v) { return NULL; }
void *getBuilderPluginRegistry(int c) { return NULL; }
void *getPluginRegistry(void) { return NULL; }
int getNvOnnxParserVersion(void) { return 0; }
int getInferLibVersion(void) { return 0; }
int initLibNvInferPlugins(void *l, const char *n) { return 0; }
"""


class BindingsUnavailable(RuntimeError):
    """The wheel could not be downloaded or the stubs not compiled; the message says which and why."""


@dataclass(frozen=True)
class Site:
    """An importable TensorRT (and cuda-python) for one major version."""

    major: int
    site: Path  # goes first on PYTHONPATH
    lib: Path  # goes first on LD_LIBRARY_PATH

    def env(self, extra_path: list[Path] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        paths = [str(self.site), *(str(p) for p in extra_path or []), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(self.lib), env.get("LD_LIBRARY_PATH", "")) if p)
        return env


def cache_root() -> Path:
    base = os.environ.get("CLIPDEPLOY_TRT_API_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clipdeploy" / "trt-api"


def _run(cmd: list[str], what: str) -> None:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BindingsUnavailable(f"{what} failed: {e}") from e
    if result.returncode != 0:
        tail = " ".join((result.stderr or result.stdout).split())[-400:]
        raise BindingsUnavailable(f"{what} failed (exit {result.returncode}): {tail}")


def obtain(major: int) -> Site:
    """Download and prepare the bindings for ``major`` (10 or 11) once; later calls reuse the cache."""
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    root = cache_root() / f"{major}-{tag}"
    site = Site(major, root / "site", root / "lib")
    if (root / "ready").is_file():
        return site
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{major}-{tag}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest-xdist workers may arrive together
        if (root / "ready").is_file():
            return site
        shutil.rmtree(root, ignore_errors=True)
        wheels = root / "wheels"
        wheels.mkdir(parents=True)
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                str(wheels),
                *VERSIONS[major],
                PATHFINDER,
            ],
            f"pip download {' '.join(VERSIONS[major])}",
        )
        for wheel in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(wheel) as z:
                z.extractall(site.site)
        (site.site / "tensorrt").mkdir(exist_ok=True)
        (site.site / "tensorrt" / "__init__.py").write_text(
            "from tensorrt_bindings import *  # noqa: F401,F403\n"
            "from tensorrt_bindings import __version__  # noqa: F401\n"
        )
        compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if compiler is None:
            raise BindingsUnavailable("no C compiler (cc, gcc or clang) to build the stub TensorRT libraries")
        site.lib.mkdir()
        (root / "stub.c").write_text(STUB_C)
        for lib in ("nvinfer", "nvinfer_plugin", "nvonnxparser"):
            name = f"lib{lib}.so.{major}"
            _run(
                [compiler, "-shared", "-fPIC", "-o", str(site.lib / name), f"-Wl,-soname,{name}", str(root / "stub.c")],
                f"compiling the stub {name}",
            )
        (root / "ready").write_text("\n".join(p.name for p in wheels.glob("*.whl")) + "\n")
    return site


def unavailable(reason: str) -> None:
    """In CI (CI=true) a missing prerequisite fails the test; elsewhere the test skips and says why."""
    import pytest

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def require(major: int) -> Site:
    """The bindings of ``major``, or a skip (a failure under CI) that says why they are missing."""
    try:
        return obtain(major)
    except BindingsUnavailable as e:
        unavailable(f"the TensorRT {major} bindings are unavailable: {e}")
        raise
