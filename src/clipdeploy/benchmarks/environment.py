"""The machine a benchmark ran on: CPU, cores, memory, load, GPU and driver, library versions."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from typing import Any

from clipdeploy.artifact.tool_versions import found_versions

_DISTRIBUTIONS = (
    "clipdeploy",
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "torch",
    "open_clip_torch",
    "tensorrt",
    "onnx",
)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), which is what a container is given."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# Instruction-set flags that decide which kernels PyTorch and ONNX Runtime pick: two CPUs with the
# same name and different flags can rank the contenders differently.
_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve",
)  # fmt: skip


def _cpuinfo() -> tuple[str, int | None, list[str]]:
    model = platform.processor() or platform.machine()
    cores: set[tuple[str | None, str]] = set()
    flags: list[str] = []
    try:
        physical = core = None
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key in ("flags", "Features") and not flags:
                    present = set(value.split())
                    flags = [x for x in _FLAGS if x in present]
                if key == "model name":
                    model = value
                elif key == "physical id":
                    physical = value
                elif key == "core id":
                    core = value
                elif not key and core is not None:
                    cores.add((physical, core))
                    physical = core = None
            if core is not None:
                cores.add((physical, core))
    except OSError:
        pass
    return model, (len(cores) or None), flags


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def nvidia_smi(query: str, *fmt: str) -> list[list[str]] | None:
    """The CSV rows of one ``nvidia-smi --query-...`` (fields stripped); None without nvidia-smi or when it fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", query, ",".join(("--format=csv", "noheader", *fmt))],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return [[p.strip() for p in line.split(",")] for line in out.stdout.splitlines()]


def gpus() -> list[dict[str, str]]:
    """NVIDIA GPUs per ``nvidia-smi``: name, driver, memory. Empty without a GPU or driver."""
    rows = nvidia_smi("--query-gpu=name,driver_version,memory.total") or []
    return [{"name": r[0], "driver": r[1], "memory": r[2]} for r in rows if len(r) == 3]


def versions() -> dict[str, str]:
    return found_versions(*_DISTRIBUTIONS)


def collect(threads: int, device: str) -> dict[str, Any]:
    """The environment block of a report."""
    model, physical, flags = _cpuinfo()
    gpu_list = gpus() if device == "cuda" else []
    return {
        "cpu": model,
        "cpu_flags": flags,
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "available_cores": available_cores(),
        "threads": threads,
        "memory_gb": _memory_gb(),
        "device": device,
        "gpus": gpu_list,
        "os": platform.platform(),
        "load_average_start": load_average(),
        "versions": versions(),
    }


def describe_machine(env: dict[str, Any]) -> str:
    """A one-line name for a machine, e.g. 'AMD EPYC, 2 cores, 24 GB' or '... + NVIDIA H100 (driver 580)'."""
    text = f"{env.get('cpu', '?')}, {env.get('available_cores', '?')} cores, {env.get('memory_gb', '?')} GB"
    for g in env.get("gpus") or []:
        text += f" + {g['name']} (driver {g['driver']})"
    return text
