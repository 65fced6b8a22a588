"""The CPUs the project meets, as fake /proc/cpuinfo files, and what the runtime's rules expect on each.

Tests whose expectation depends on the CPU derive it from ``clipdeploy.cpu_features`` (this machine)
and check both branches on any machine by pointing ``cpu_features.CPUINFO`` at one of these.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import pytest

from clipdeploy import cpu_features
from clipdeploy.runtime.backends.registry import has_module

_BASE = "fpu sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c"
CPUS = {
    "avx2": _BASE,  # e.g. an older EPYC or Xeon: no int8 dot product
    "avx512-vnni": f"{_BASE} avx512f avx512bw avx512_vnni avx512_bf16",  # e.g. EPYC Genoa, Cascade Lake
    "amx": f"{_BASE} avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8",  # Sapphire Rapids
}
VNNI_CPUS = ("avx512-vnni", "amx")

_CPUINFO = """processor\t: 0
vendor_id\t: GenuineTest
model name\t: {name}
flags\t\t: {flags}
"""


def use_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: str) -> None:
    """Make ``cpu_features`` read a fake cpuinfo of ``kind`` (a key of CPUS) until the test ends."""
    fake = tmp_path / f"cpuinfo-{kind}"
    fake.write_text(_CPUINFO.format(name=f"test CPU ({kind})", flags=CPUS[kind]), encoding="utf-8")
    monkeypatch.setattr(cpu_features, "CPUINFO", fake)
    # A fresh cache of the same reader: the module's own cache (this machine's flags) is left untouched and
    # comes back when monkeypatch undoes this.
    monkeypatch.setattr(cpu_features, "flags", functools.lru_cache(maxsize=1)(cpu_features.flags.__wrapped__))


def openvino_runs_here() -> bool:
    """Whether the openvino backend can be chosen at all here: installed, on x86."""
    return has_module("openvino") and platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def auto_cpu_backend() -> str:
    """What ``clipdeploy.load(dir)`` picks on this CPU for an artifact with accepted int8 variants and no
    engines, by the documented rule: OpenVINO where it is installed on an x86 CPU with VNNI, else ONNX Runtime."""
    return "openvino" if openvino_runs_here() and cpu_features.has_vnni() else "onnxruntime"
